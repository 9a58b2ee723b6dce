"""Manifest loading: each kind of bad row is reported with its CSV line and slide id."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.data.manifest import load_manifest


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_valid_classification_manifest(tmp_path: Path, coded_cache) -> None:
    path = _write(tmp_path, "case_id,slide_id,label,path\nA,s00,0,x.svs\nB,s01,1,y.svs\nB,s10,1,z.svs\n")
    df = load_manifest(path, "classification", num_classes=2, cache=PatchCache(coded_cache.path))
    assert df["label"].tolist() == [0, 1, 1] and str(df["label"].dtype) == "int64"
    assert df["line"].tolist() == [2, 3, 4] and df["path"].tolist() == ["x.svs", "y.svs", "z.svs"]


def test_class_names_map_to_indices(tmp_path: Path) -> None:
    path = _write(tmp_path, "case_id,slide_id,label\nA,a1,ILC\nB,b1,IDC\nC,c1,1\n")
    df = load_manifest(path, "classification", class_names=["IDC", "ILC"])
    assert df["label"].tolist() == [1, 0, 1]


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        ("A,a1,0\nB,a1,1\n", 3, "duplicate slide id"),
        ("A,a1,0\nB,b1,\n", 3, "missing or unknown"),
        ("A,a1,0\nB,b1,cat\n", 3, "missing or unknown"),
        ("A,a1,0\nB,b1,1.5\n", 3, "missing or unknown"),
        ("A,a1,0\nB,b1,2\n", 3, "outside 0..1"),
        ("A,a1,0\nB,b1,-1\n", 3, "outside 0..1"),
        ("A,a1,0\nB,../etc,1\n", 3, "invalid slide id"),
        ("A,a1,0\nB,b1,1,training\n", 3, "split 'training'"),
    ],
)
def test_classification_errors_name_the_row(tmp_path: Path, body: str, line: int, needle: str) -> None:
    header = "case_id,slide_id,label,split\n" if "training" in body else "case_id,slide_id,label\n"
    path = _write(tmp_path, header + body)
    with pytest.raises(ValueError, match=needle) as info:
        load_manifest(path, "classification", num_classes=2)
    assert f"line {line} " in str(info.value)


def test_slide_missing_from_cache_names_the_row(tmp_path: Path, coded_cache) -> None:
    path = _write(tmp_path, "case_id,slide_id,label\nA,s00,0\nB,zz9,1\n")
    with pytest.raises(ValueError, match=r"line 3 \(slide_id 'zz9'\): slide is not in the patch cache"):
        load_manifest(path, "classification", num_classes=2, cache=PatchCache(coded_cache.path))


def test_empty_class_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, "case_id,slide_id,label\nA,a1,0\nB,b1,2\n")
    with pytest.raises(ValueError, match="class 1 has no slide"):
        load_manifest(path, "grading", num_classes=3)


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "case_id,slide_id,label\nA,a1,0\nA,a1,0\n\nB,b1,9\nC,c1,1\n")
    with pytest.raises(ValueError) as info:
        load_manifest(path, "classification", num_classes=2)
    message = str(info.value)
    assert "2 problem(s)" in message and "line 3 " in message and "line 5 " in message  # blank line 4 counted


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ("B,b1,0,1", "positive"),
        ("B,b1,-3,1", "positive"),
        ("B,b1,,1", "positive"),
        ("B,b1,nan,1", "positive"),
        ("B,b1,5,2", "event"),
        ("B,b1,5,", "event"),
        ("B,b1,5,yes", "event"),
    ],
)
def test_survival_errors_name_the_row(tmp_path: Path, row: str, needle: str) -> None:
    path = _write(tmp_path, f"case_id,slide_id,time,event\nA,a1,12.5,1\n{row}\n")
    with pytest.raises(ValueError, match=needle) as info:
        load_manifest(path, "survival")
    assert "line 3 (slide_id 'b1')" in str(info.value)


def test_valid_survival_and_case_consistency(tmp_path: Path) -> None:
    path = _write(tmp_path, "case_id,slide_id,time,event\nA,a1,12.5,1\nA,a2,12.5,1\nB,b1,3,0.0\n")
    df = load_manifest(path, "survival")
    assert df["time"].tolist() == [12.5, 12.5, 3.0] and df["event"].tolist() == [1, 1, 0]
    bad = _write(tmp_path, "case_id,slide_id,time,event\nA,a1,12.5,1\nA,a2,10,1\n")
    with pytest.raises(ValueError, match="lines 2, 3 .*disagree"):
        load_manifest(bad, "survival")


def test_case_split_across_sides_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "case_id,slide_id,label,split\nA,a1,0,train\nA,a2,1,TEST\nB,b1,1,val\n")
    with pytest.raises(ValueError, match="different splits"):
        load_manifest(path, "classification")


def test_missing_columns_and_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['time', 'event'\]"):
        load_manifest(_write(tmp_path, "case_id,slide_id,label\nA,a1,0\n"), "survival")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv", "classification")


@pytest.mark.parametrize("case_id", ["case 1", "site/7", "a\\b", "tab\there"])
def test_bad_case_ids_are_listed_up_front(tmp_path: Path, case_id: str) -> None:
    path = tmp_path / "manifest.csv"
    path.write_text(f'case_id,slide_id,label\nA,a1,0\n"{case_id}",b1,1\nC,c1,1\n')
    with pytest.raises(ValueError, match=r"1 problem\(s\)") as info:
        load_manifest(path, "classification")
    assert f"line 3 (slide_id 'b1'): case_id {case_id!r}" in str(info.value)


def test_bom_and_spaced_header_are_read(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"\xef\xbb\xbf case_id , slide_id ,label\nA,a1,0\nB,b1,1\n")
    df = load_manifest(path, "classification")
    assert df["slide_id"].tolist() == ["a1", "b1"]


def test_zero_byte_manifest_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty: it needs a header line"):
        load_manifest(path, "classification")


def test_one_file_under_two_slide_ids_is_refused(tmp_path: Path) -> None:
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "x.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 50)
    (tmp_path / "slides" / "y.svs").write_bytes(b"II*\x00" + bytes(range(255, -1, -1)) * 50)
    path = tmp_path / "manifest.csv"
    path.write_text(
        "case_id,slide_id,label,path\nA,a1,0,slides/x.svs\nB,b1,1,slides/y.svs\n"
        f"C,c1,1,{tmp_path / 'slides' / '..' / 'slides' / 'x.svs'}\n"
    )
    with pytest.raises(ValueError, match="leak") as info:
        load_manifest(path, "classification")
    message = str(info.value)
    assert (
        "line 4 (slide_id 'c1', case_id 'C') and line 2 (slide_id 'a1', case_id 'A') are the same file"
        in message
    )


def test_a_copy_of_a_slide_under_another_id_is_refused(tmp_path: Path) -> None:
    data = b"II*\x00" + bytes(range(256)) * 20_000  # 5 MB: first and last MiB hashed
    (tmp_path / "x.svs").write_bytes(data)
    (tmp_path / "copy.svs").write_bytes(data)
    (tmp_path / "other.svs").write_bytes(data[:-1] + b"\x01")  # same size, different content
    path = tmp_path / "manifest.csv"
    path.write_text("case_id,slide_id,label,path\nA,a1,0,x.svs\nB,b1,1,other.svs\nC,c1,1,copy.svs\n")
    with pytest.raises(ValueError, match=r"1 problem\(s\)") as info:
        load_manifest(path, "classification")
    assert (
        "line 4 (slide_id 'c1', case_id 'C') and line 2 (slide_id 'a1', case_id 'A') are identical files"
        in str(info.value)
    )
