import pytest

from dppmg.io import atomic_path, commit_dir, read_json, staging_dir, write_json


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_staging_and_commit_replace_whole_folder(tmp_path):
    final = tmp_path / "ds"
    final.mkdir()
    (final / "old.txt").write_text("old")
    stage = staging_dir(final)
    (stage / "new.txt").write_text("new")
    commit_dir(stage, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_staging_dir_clears_stale_partials(tmp_path):
    final = tmp_path / "ds"
    first = staging_dir(final)
    (first / "junk").write_text("x")
    second = staging_dir(final)  # an interrupted earlier run left `first` behind
    assert not first.exists() and second.exists()


def test_outputs_are_world_readable(tmp_path):
    write_json(tmp_path / "m.json", {})
    assert (tmp_path / "m.json").stat().st_mode & 0o044 == 0o044


def test_committed_folder_is_world_readable(tmp_path):
    stage = staging_dir(tmp_path / "ds")
    commit_dir(stage, tmp_path / "ds")
    assert (tmp_path / "ds").stat().st_mode & 0o055 == 0o055
