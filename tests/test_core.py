"""echobook.core: atomic writes, JSON reading, locks, hashes and data identity stamps."""
import json, multiprocessing as mp, os, time
import numpy as np
import pytest

from echobook.core import (EchobookDataError, EchobookError, atomic_write_json, dataset_stamp, file_lock, read_json,
                           save_npy_atomic, source_stamp, stable_hash, stamps_differ, torch_save_atomic, code_version,
                           environment_info)


def test_corrupt_json_names_the_file(tmp_path):
    (tmp_path/'config.json').write_text('{"lr": ')
    with pytest.raises(EchobookError, match=r'config.json: corrupt JSON'):
        read_json(tmp_path/'config.json')
    assert read_json(tmp_path/'absent.json', 'd') == 'd'


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    import torch
    atomic_write_json(tmp_path/'a.json', {'x': np.float32(1.5), 'nan': float('nan')})
    save_npy_atomic(tmp_path/'a.npy', np.zeros((2, 3), np.uint8))
    torch_save_atomic({'w': torch.arange(3)}, tmp_path/'a.pth')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.json', 'a.npy', 'a.pth']
    assert read_json(tmp_path/'a.json') == {'x': 1.5, 'nan': None}
    assert np.load(tmp_path/'a.npy').shape == (2, 3) and torch.load(tmp_path/'a.pth')['w'].tolist() == [0, 1, 2]


def _hold(path, seconds, q):
    with file_lock(path):
        q.put(time.monotonic()); time.sleep(seconds)


def test_file_lock_excludes_another_process(tmp_path):
    q = mp.get_context('fork').Queue()
    p = mp.get_context('fork').Process(target=_hold, args=(tmp_path/'l.lock', 1.0, q)); p.start()
    q.get(timeout=20)
    with pytest.raises(TimeoutError, match='l.lock'):
        with file_lock(tmp_path/'l.lock', timeout=0.2): pass
    t0 = time.monotonic()
    with file_lock(tmp_path/'l.lock', timeout=20): waited = time.monotonic() - t0
    p.join()
    assert waited > 0.3


def test_stable_hash_is_canonical():
    assert stable_hash({'a': 1, 'b': [1.0, 'x']}) == stable_hash({'b': (1.0, 'x'), 'a': np.int64(1)})
    assert stable_hash({'a': 1}) != stable_hash({'a': 2}) and len(stable_hash({}, n=6)) == 6


def test_stamps_see_an_edit_of_the_same_size(tmp_path):
    f = tmp_path/'v.avi'; f.write_bytes(b'a' * 100)
    old = source_stamp(f)
    f.write_bytes(b'b' * 100); os.utime(f, ns=(old['mtime_ns'] + 10**9, old['mtime_ns'] + 10**9))
    assert stamps_differ(old, source_stamp(f))
    c = source_stamp(f, content=True)
    os.utime(f, ns=(1, 1))                      # touched, content unchanged: the content hash says "same"
    assert not stamps_differ(c, source_stamp(f, content=True)) and stamps_differ(c, source_stamp(f))
    with pytest.raises(EchobookDataError, match='nope.avi'): source_stamp(tmp_path/'nope.avi')


def test_dataset_stamp_changes_when_one_file_changes(tmp_path):
    files = [tmp_path/'Videos'/f'{i}.avi' for i in range(4)]
    files[0].parent.mkdir()
    for i, f in enumerate(files): f.write_bytes(bytes([i]) * 50)
    h = dataset_stamp(files)
    assert dataset_stamp(files[::-1]) == h and dataset_stamp(files[:3]) != h
    files[2].write_bytes(b'x' * 51)
    assert dataset_stamp(files) != h


def test_environment_records_the_code_version():
    env = environment_info()
    assert env['code_version'] == code_version() and env['python']
