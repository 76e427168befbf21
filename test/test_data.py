"""Readers on generated trees, the PK sampler's invariants, transforms, loaders, the synthetic set and
the messages for bad input."""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataError, PKSampler, build_datasets, read_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jpeg(path, colour=(128, 64, 32), size=(8, 16)):
    """A tiny solid-colour JPEG at `path` (parents created)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', size, colour).save(path)


def write_market(folder, names_by_split):
    """Empty-content JPEGs named as given under bounding_box_train/, query/, bounding_box_test/."""
    for sub, names in zip(('bounding_box_train', 'query', 'bounding_box_test'), names_by_split):
        for name in names:
            write_jpeg(os.path.join(folder, sub, name))


MARKET_NAMES = (
    ['0002_c1s1_000451_03.jpg', '0002_c2s1_000551_01.jpg', '0007_c3s1_000001_00.jpg',
     '-1_c1s1_000401_03.jpg', '0000_c1s1_000151_01.jpg'],  # junk and a distractor in train: dropped
    ['0010_c1s1_001051_00.jpg', '-1_c2s1_000001_00.jpg', '0000_c3s1_000002_00.jpg'],
    ['0010_c6s2_001051_00.jpg', '0000_c1s1_000003_00.jpg', '-1_c4s1_000004_00.jpg'],
)


@pytest.fixture(scope='module')
def tiny_synthetic(tmp_path_factory):
    """A tiny synthetic data set (8 train + 8 test identities, 64x32)."""
    root = str(tmp_path_factory.mktemp('syn') / 'synthetic')
    data.synthesize(root, ids=16, images_per_id=6, cameras=3, size=(64, 32), progress=False)
    return root


# ------------------------------------------------------------------------------------------------
# Readers


def test_market_drops_junk_everywhere_keeps_distractors_in_the_gallery_only(tmp_path):
    write_market(tmp_path / 'Market-1501-v15.09.15', MARKET_NAMES)
    ds = read_dataset('market1501', str(tmp_path))  # ROOT holds the data set folder
    assert [(os.path.basename(p), pid, cam) for p, pid, cam in ds['train']] == [
        ('0002_c1s1_000451_03.jpg', 0, 0), ('0002_c2s1_000551_01.jpg', 0, 1), ('0007_c3s1_000001_00.jpg', 1, 2)]
    assert ds['num_train_pids'] == 2 and ds['has_cameras'] and ds['name'] == 'market1501'
    assert [(pid, cam) for _, pid, cam in ds['query']] == [(10, 0)]
    assert sorted((pid, cam) for _, pid, cam in ds['gallery']) == [(0, 0), (10, 5)]
    # the data set folder itself and the folder's own spelling as the name
    same = read_dataset('Market-1501-v15.09.15', str(tmp_path / 'Market-1501-v15.09.15'))
    assert same['train'] == ds['train'] and same['gallery'] == ds['gallery']


def test_duke_names_and_spelling(tmp_path):
    write_market(tmp_path / 'DukeMTMC-reID', (['0005_c2_f0046985.jpg', '0001_c8_f0000001.jpg'],
                                             ['0030_c1_f0000002.jpg'], ['0030_c5_f0000003.jpg']))
    ds = read_dataset('DukeMTMC-reID', str(tmp_path))
    assert [(pid, cam) for _, pid, cam in ds['train']] == [(0, 7), (1, 1)]  # sorted pids 1, 5 -> 0, 1
    assert ds['name'] == 'dukemtmcreid' and ds['query'][0][1:] == (30, 0)


def test_msmt17_lists_union_train_and_val_cameras_from_names(tmp_path):
    root = tmp_path / 'MSMT17_V1'
    lists = {'list_train.txt': ['0000/0000_000_01_0303morning_0015_0.jpg 0',
                                '0002/0002_001_03_0303morning_0016_0.jpg 2'],
             'list_val.txt': ['0000/0000_002_15_0303noon_0001_1.jpg 0'],
             'list_query.txt': ['0000/0000_000_02_0113morning_0001_0.jpg 0'],
             'list_gallery.txt': ['0000/0000_001_05_0113noon_0002_0.jpg 0',
                                  '0001/0001_000_02_0113noon_0003_0.jpg 1']}
    for list_name, lines in lists.items():
        sub = 'train' if list_name in ('list_train.txt', 'list_val.txt') else 'test'
        for line in lines:
            write_jpeg(str(root / sub / line.split()[0]))
        (root / list_name).write_text('\n'.join(lines) + '\n')
    ds = read_dataset('msmt17', str(tmp_path))
    assert [(pid, cam) for _, pid, cam in ds['train']] == [(0, 0), (1, 2), (0, 14)]
    assert [(pid, cam) for _, pid, cam in ds['query']] == [(1, 1)]  # test pids +1: pid 0 is "distractor"
    assert [(pid, cam) for _, pid, cam in ds['gallery']] == [(1, 4), (2, 1)]
    assert all(os.path.isfile(p) for split in ('train', 'query', 'gallery') for p, _, _ in ds[split])


def write_coco(folder, split, entries, json_name=None):
    """A COCO-style file `split`.json and images folder/split/<file> for (file, pair_id, source)."""
    images = [{'id': i + 100, 'file_name': f} for i, (f, _, _) in enumerate(entries)]
    annotations = [{'id': i, 'image_id': i + 100, 'pair_id': pair, 'source': src}
                   for i, (_, pair, src) in enumerate(entries)]
    for f, _, _ in entries:
        write_jpeg(os.path.join(folder, split, f))
    with open(os.path.join(folder, json_name or f'{split}.json'), 'w') as out:
        json.dump({'images': images, 'annotations': annotations}, out)


def test_coco_fashion_sets_drop_single_image_train_pairs_and_have_no_cameras(tmp_path):
    folder = str(tmp_path / 'street2shop')
    write_coco(folder, 'train', [('a.jpg', 7, 'user'), ('b.jpg', 7, 'shop'), ('c.jpg', 3, 'user'),
                                 ('d.jpg', 9, 'user'), ('e.jpg', 9, 'shop')], 'train_128_256.json')
    write_coco(folder, 'query', [('q.jpg', 0, 'user')], 'query_128_256.json')
    write_coco(folder, 'gallery', [('g.jpg', 0, 'shop'), ('h.jpg', 5, 'shop')], 'gallery_128_256.json')
    ds = read_dataset('Street2Shop', str(tmp_path))
    assert [(os.path.basename(p), pid) for p, pid, _ in ds['train']] == [
        ('a.jpg', 0), ('b.jpg', 0), ('d.jpg', 1), ('e.jpg', 1)]  # pair 3 has one image: dropped
    assert [(pid, cam) for _, pid, cam in ds['query']] == [(1, 0)]
    assert [(pid, cam) for _, pid, cam in ds['gallery']] == [(1, 1), (6, 1)]  # never pid 0
    assert not ds['has_cameras']


def test_folder_layout_with_and_without_cameras(tmp_path):
    for split, identity, name in [('train', 'bob', 'x_c2_1.jpg'), ('train', 'ann', 'y_c1_1.jpg'),
                                  ('query', 'zed', 'q_c2_1.jpg'), ('gallery', 'zed', 'g_c5_1.png'),
                                  ('gallery', 'amy', 'h_c1_1.jpg')]:
        write_jpeg(str(tmp_path / 'cams' / split / identity / name))
    ds = read_dataset('folder', str(tmp_path / 'cams'))
    assert ds['has_cameras'] and [(os.path.basename(p), pid, cam) for p, pid, cam in ds['train']] == [
        ('y_c1_1.jpg', 0, 0), ('x_c2_1.jpg', 1, 1)]
    assert ds['query'][0][1:] == (2, 1) and sorted(item[1:] for item in ds['gallery']) == [(1, 0), (2, 2)]
    for split, identity in [('train', 'a'), ('train', 'b'), ('query', 'c'), ('gallery', 'c')]:
        write_jpeg(str(tmp_path / 'plain' / split / identity / '1.jpg'))
    ds = read_dataset('FOLDER', str(tmp_path / 'plain'))
    assert not ds['has_cameras'] and ds['query'][0][1:] == (1, 0) and ds['gallery'][0][1:] == (1, 1)


def test_several_names_train_on_the_union_and_evaluate_the_first(tmp_path):
    write_market(tmp_path / 'market1501', MARKET_NAMES)
    write_market(tmp_path / 'DukeMTMC-reID', (['0005_c2_f0046985.jpg', '0001_c8_f0000001.jpg'],
                                             ['0030_c1_f0000002.jpg'], ['0030_c5_f0000003.jpg']))
    ds = build_datasets(['dukemtmcreid', 'market1501'], str(tmp_path))
    assert ds['num_train_pids'] == 4 and [pid for _, pid, _ in ds['train']] == [0, 1, 2, 2, 3]
    assert ds['query'] == read_dataset('dukemtmcreid', str(tmp_path))['query']


# ------------------------------------------------------------------------------------------------
# Sampler


def make_pids(counts):
    """Dataset pids, identity i repeated counts[i] times, shuffled so indices are not grouped."""
    pids = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(0).permutation(pids).tolist()


def test_batches_are_p_distinct_identities_times_k_identity_major():
    pids = make_pids([1, 2, 3, 4, 5, 9, 17, 6, 6, 6, 4, 8])
    sampler = PKSampler(pids, num_ids=3, num_instances=3, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        batch_pids = np.array(pids)[batch].reshape(3, 3)  # [P, K]
        assert (batch_pids == batch_pids[:, :1]).all()  # K consecutive indices per identity
        assert len(set(batch_pids[:, 0])) == 3  # P distinct identities


def test_epochs_are_a_pure_function_of_seed_and_epoch():
    pids = make_pids([5] * 20)
    a, b = PKSampler(pids, 4, 4, seed=1), PKSampler(pids, 4, 4, seed=1)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b) == list(a)  # iterating twice gives the same epoch
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(PKSampler(pids, 4, 4, seed=2)) != list(PKSampler(pids, 4, 4, seed=1))
    restored = PKSampler(pids, 4, 4)
    restored.load_state_dict(a.state_dict())
    assert list(restored) == list(a)


def test_a_resumed_epoch_continues_with_the_batches_it_had_not_seen():
    pids = make_pids([5] * 20)
    sampler = PKSampler(pids, 4, 4, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_step=2)
    assert list(sampler) == full[2:] and len(sampler) == len(full)


def test_an_epoch_visits_every_image_about_once():
    counts = [4, 8, 12, 4, 8, 16, 4, 8, 4, 12] * 3  # multiples of K: no top-up needed
    pids = make_pids(counts)
    sampler = PKSampler(pids, num_ids=5, num_instances=4, seed=0)
    visits = collections.Counter(i for batch in sampler for i in batch)
    dropped = len(pids) - len(visits)
    assert max(visits.values()) == 1 and dropped < 5 * 4  # only the last < P chunks are dropped


def test_short_identities_are_topped_up_with_their_own_images():
    pids = make_pids([1, 2, 3, 6, 7] + [4] * 8)
    for epoch in range(5):
        sampler = PKSampler(pids, num_ids=4, num_instances=4, seed=0)
        sampler.set_epoch(epoch)
        for batch in sampler:
            for group in np.array(batch).reshape(4, 4):
                own = [i for i, p in enumerate(pids) if p == pids[group[0]]]
                assert set(group) <= set(own)  # never another identity's image, never a mock
                assert len(set(group)) == min(4, len(own))  # distinct images while there are enough


def test_two_ranks_are_disjoint_at_every_step_with_equal_steps_and_cover_the_epoch():
    pids = make_pids([4, 8, 5, 3, 12, 4, 7, 9, 4, 4, 6, 2, 10, 4])
    ranks = [PKSampler(pids, num_ids=2, num_instances=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(1)
    steps = [list(s) for s in ranks]
    assert len(steps[0]) == len(steps[1]) == len(ranks[0]) == len(ranks[1])
    for b0, b1 in zip(*steps):
        assert not {pids[i] for i in b0} & {pids[i] for i in b1}
    seen = {i for rank_steps in steps for batch in rank_steps for i in batch}
    single = PKSampler(pids, num_ids=4, num_instances=4, seed=3)
    single.set_epoch(1)
    assert len(seen) >= len(pids) - 4 * 4 and len(steps[0]) == len(single)


def test_impossible_batch_sizes_say_what_is_possible():
    pids = make_pids([4] * 6)
    with pytest.raises(DataError, match=r'6 identities.*IMS_PER_BATCH <= 6'):
        PKSampler(pids, num_ids=8, num_instances=4)
    with pytest.raises(DataError, match=r'IMS_PER_BATCH <= 3 with 2 devices'):
        PKSampler(pids, num_ids=4, num_instances=4, world_size=2)
    with pytest.raises(DataError, match='K >= 2'):
        PKSampler(pids, num_ids=2, num_instances=1)
    assert data.describe_batch(16, 4) == '16 identities × 4 images = 64 images per device'


# ------------------------------------------------------------------------------------------------
# Transforms and loaders


def test_transform_shapes_and_flip():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 30, 3), dtype=np.uint8))
    train = data.build_train_transform((64, 32))(image)
    test = data.build_test_transform((64, 32))(image)
    assert train.shape == test.shape == (3, 64, 32) and train.dtype == torch.float32
    assert abs(float(test.mean())) < 2  # ImageNet-normalised, not 0..255
    flipped = data.build_train_transform((64, 32), flip_prob=1.0, padding=0, re_prob=0.0)(image)
    assert torch.allclose(flipped, test.flip(-1))
    erased = data.build_train_transform((64, 32), flip_prob=0.0, padding=0, re_prob=1.0)(image)
    assert (erased == 0).all(dim=0).sum() >= 0.02 * 64 * 32  # an erased box filled with the mean


@pytest.mark.parametrize('workers', [0, 2])
def test_train_and_test_loaders(tiny_synthetic, workers):
    ds = read_dataset('synthetic', os.path.dirname(tiny_synthetic))  # ROOT holding synthetic/
    loader, sampler = data.build_train_loader(ds['train'], 4, 3, (64, 32), workers, seed=1)
    sampler.set_epoch(0)
    images, pids, camids = next(iter(loader))
    assert images.shape == (12, 3, 64, 32) and len(set(pids.tolist())) == 4
    assert (pids.view(4, 3) == pids.view(4, 3)[:, :1]).all()
    test_loader = data.build_test_loader(ds['query'], (64, 32), 5, workers)
    assert torch.cat([p for _, p, _ in test_loader]).tolist() == [pid for _, pid, _ in ds['query']]


# ------------------------------------------------------------------------------------------------
# Synthetic data set


def test_synthetic_set_is_deterministic_market_named_with_junk_and_distractors(tiny_synthetic, tmp_path):
    again = str(tmp_path / 'again')
    data.synthesize(again, ids=16, images_per_id=6, cameras=3, size=(64, 32), progress=False)
    for sub in ('bounding_box_train', 'query', 'bounding_box_test'):
        names = sorted(os.listdir(os.path.join(tiny_synthetic, sub)))
        assert names == sorted(os.listdir(os.path.join(again, sub)))
        assert all(data.MARKET_PATTERN.fullmatch(n) for n in names)
        with open(os.path.join(tiny_synthetic, sub, names[-1]), 'rb') as a, \
                open(os.path.join(again, sub, names[-1]), 'rb') as b:
            assert a.read() == b.read()
    gallery = os.listdir(os.path.join(tiny_synthetic, 'bounding_box_test'))
    assert any(n.startswith('-1_') for n in gallery) and any(n.startswith('0000_') for n in gallery)
    ds = read_dataset('synthetic', tiny_synthetic)
    assert ds['num_train_pids'] == 8
    assert sorted({pid for _, pid, _ in ds['train']}) == list(range(8))  # relabelled 0..N-1
    for _, pid, cam in ds['query']:  # every query has a true match in another camera
        assert any(g_pid == pid and g_cam != cam for _, g_pid, g_cam in ds['gallery'])
    assert Image.open(ds['query'][0][0]).size == (32, 64)
    with pytest.raises(DataError, match='already holds files'):
        data.synthesize(again, ids=16, progress=False)


def test_pixel_baseline_is_perfect_when_gallery_images_copy_the_queries(tmp_path):
    colours = {1: (250, 0, 0), 2: (0, 250, 0), 3: (0, 0, 250)}
    folder = tmp_path / 'synthetic'
    for pid, colour in colours.items():
        write_jpeg(str(folder / 'bounding_box_train' / f'{pid:04d}_c1s1_000001_00.jpg'), colour)
        write_jpeg(str(folder / 'query' / f'{pid:04d}_c1s1_000002_00.jpg'), colour)
        write_jpeg(str(folder / 'bounding_box_test' / f'{pid:04d}_c2s1_000003_00.jpg'), colour)
    assert data.pixel_baseline_map(str(tmp_path)) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Bad input


def test_missing_root_subfolder_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match=f'{tmp_path}/nowhere does not exist'):
        read_dataset('market1501', str(tmp_path / 'nowhere'))
    with pytest.raises(DataError, match=r'no market1501 data set.*Market-1501-v15.09.15/.*holds: nothing'):
        read_dataset('market1501', str(tmp_path))
    write_jpeg(str(tmp_path / 'market1501' / 'query' / '0001_c1s1_000001_00.jpg'))
    with pytest.raises(DataError, match=r'bounding_box_train/ but it is missing; .*market1501 holds: query/'):
        read_dataset('market1501', str(tmp_path))
    with pytest.raises(DataError, match='unknown data set .cuhk03.: use one of market1501'):
        read_dataset('cuhk03', str(tmp_path))


def test_names_that_do_not_match_show_one_that_would(tmp_path):
    write_market(tmp_path / 'DukeMTMC-reID', (['0002_c1s1_000451_03.jpg'], ['x.jpg'], ['y.jpg']))
    with pytest.raises(DataError, match=r'0002_c1s1_000451_03.jpg: the file name does not match.*'
                                        r'a name that would: 0005_c2_f0046985.jpg'):
        read_dataset('dukemtmcreid', str(tmp_path))


def test_an_empty_split_is_named(tmp_path):
    write_market(tmp_path, (['0002_c1s1_000451_03.jpg'], ['-1_c1s1_000001_00.jpg'], ['0002_c2s1_000001_00.jpg']))
    with pytest.raises(DataError, match=f'the query split of market1501 in {tmp_path} is empty'):
        read_dataset('market1501', str(tmp_path))


def test_json_without_pair_id(tmp_path):
    write_coco(str(tmp_path), 'train', [('a.jpg', 1, 'user'), ('b.jpg', 1, 'shop')])
    write_coco(str(tmp_path), 'query', [('q.jpg', 1, 'user')])
    write_coco(str(tmp_path), 'gallery', [('g.jpg', 1, 'shop')])
    coco = json.loads((tmp_path / 'gallery.json').read_text())
    del coco['annotations'][0]['pair_id']
    (tmp_path / 'gallery.json').write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r'gallery.json: annotation 0 has no "pair_id"'):
        read_dataset('df1', str(tmp_path))


def test_a_corrupt_image_names_its_path_at_load_time_and_check_lists_it(tmp_path):
    write_market(tmp_path, (['0002_c1s1_000451_03.jpg', '0002_c2s1_000452_03.jpg'], ['0005_c1s1_000001_00.jpg'],
                            ['0005_c2s1_000001_00.jpg']))
    bad = tmp_path / 'query' / '0005_c1s1_000001_00.jpg'
    bad.write_bytes(b'\xff\xd8 not really a jpeg')
    ds = read_dataset('market1501', str(tmp_path))
    with pytest.raises(DataError, match=f'cannot read image {bad}'):
        data.ImageDataset(ds['query'], data.build_test_transform((16, 8)))[0]
    loader = data.build_test_loader(ds['query'], (16, 8), 1, num_workers=1)  # raised in a worker
    with pytest.raises(DataError, match=f'^cannot read image {bad}') as error:
        next(iter(loader))
    assert 'Traceback' not in str(error.value)
    run = subprocess.run([sys.executable, 'data.py', 'check', str(tmp_path), '--dataset', 'market1501'],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and str(bad) in run.stdout and '1 bad' in run.stdout
    assert 'Traceback' not in run.stderr


def test_device_augment_loader_yields_pk_batches_and_names_a_corrupt_file(tiny_synthetic, tmp_path):
    items = read_dataset('synthetic', tiny_synthetic)['train']
    loader = data.DeviceAugmentLoader(items, 2, 2, (32, 16), 0, 'cpu')
    images, pids, _ = next(iter(loader))
    assert images.shape == (4, 3, 32, 16) and images.dtype == torch.float32
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'\xff\xd8 not really a jpeg')
    loader = data.DeviceAugmentLoader([(str(bad), 0, 0)] + items[1:], 2, 2, (32, 16), 0, 'cpu')
    with pytest.raises(DataError, match=f'{bad}: not a readable JPEG'):
        for _ in loader:
            pass


def test_cli_errors_have_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, 'data.py', 'check', str(tmp_path / 'missing'), '--dataset', 'duke'],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and 'Traceback' not in run.stderr
    assert run.stderr.startswith(f'error: data root {tmp_path}/missing does not exist')
