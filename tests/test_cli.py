"""The command line: exit codes, one-line errors without traceback, nothing written on bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cocofactory import edit_coco, make_coco

from kfold_ray._cli import main

# Malformed datasets (see test_dataset.py for the full corpus of load_coco): here, that the CLI
# turns each into exit 2 and one line naming the culprit, for `validate` and for `run`.
CORPUS = {
    "truncated json": (lambda p: p.write_text(p.read_text()[:-40]), r"invalid JSON at line"),
    "top level list": (lambda p: p.write_text("[]"), r"top level must be a json object"),
    "no categories key": (lambda p: edit_coco(p, lambda d: d.pop("categories")), r"missing top-level field 'categories'"),
    "duplicate image id": (lambda p: edit_coco(p, lambda d: d["images"][1].update(id=d["images"][0]["id"])), r"images\[1\] \(id \d+\): duplicate image id"),
    "unknown category": (lambda p: edit_coco(p, lambda d: d["annotations"][0].update(category_id=999)), r"annotations\[0\] \(id \d+\): 'category_id' 999"),
    "negative width": (lambda p: edit_coco(p, lambda d: d["annotations"][2].update(bbox=[5, 5, -3, 4])), r"annotations\[2\] \(id \d+\): 'bbox' .* negative width"),
    "NaN bbox": (lambda p: p.write_text(p.read_text().replace('"bbox": [', '"bbox": [NaN, ', 1)), r"bbox"),
    "escaping path": (lambda p: edit_coco(p, lambda d: d["images"][0].update(file_name="../secret.png")), r"images\[0\] \(id \d+\): 'file_name' \"../secret.png\" escapes the image root"),
    "missing file": (lambda p: (p.parent / "images" / "img_00003.png").unlink(), r"images\[3\] \(id \d+\): file \"img_00003.png\" not found"),
    "corrupt image": (lambda p: (p.parent / "images" / "img_00004.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"), r"images\[4\] \(id \d+\): corrupt or unreadable image"),
    "size mismatch": (lambda p: edit_coco(p, lambda d: d["images"][5].update(width=200)), r"images\[5\] \(id \d+\): 'width'/'height' 200x80 do not match"),
    "no annotations": (lambda p: edit_coco(p, lambda d: d.update(annotations=[])), r"'annotations' is empty"),
}


@pytest.fixture
def dataset(tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=12)
    assert images == ann.parent / "images"
    return ann, images


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kfold_ray._cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, dataset, tmp_path, capsys):
    ann, images = dataset
    corrupt, pattern = CORPUS[case]
    corrupt(ann)
    for command in (["validate"], ["run", "--run-dir", str(tmp_path / "run"), "-k", "3"]):
        code = main([*command, "--annotations", str(ann), "--images", str(images)])
        err = capsys.readouterr().err
        assert code == 2, (case, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("kfold-ray: error: "), err
        assert re.search(pattern, err), err
        assert not (tmp_path / "run").exists(), "nothing may be written on bad input"


@pytest.mark.parametrize("k, pattern", [(1, r"k must be an integer >= 2"), (13, r"k.*12")])
def test_bad_k_exits_2(dataset, tmp_path, capsys, k, pattern):
    ann, images = dataset
    code = main(["run", "--annotations", str(ann), "--images", str(images), "-k", str(k),
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


def test_group_split_with_fewer_groups_than_k_exits_2(dataset, tmp_path, capsys):
    ann, images = dataset  # 12 images, video_id = i // 3: 4 groups
    code = main(["validate", "--annotations", str(ann), "--images", str(images), "-k", "5",
                 "--split", "group", "--group-field", "video_id"])
    err = capsys.readouterr().err
    assert code == 2 and "4" in err and "5" in err, err


def test_bad_detectron2_override_exits_2_before_anything_runs(dataset, tmp_path, capsys):
    ann, images = dataset
    code = main(["run", "--annotations", str(ann), "--images", str(images), "-k", "2",
                 "--model", "tiny", "--opts", "SOLVER.NO_SUCH_KEY", "1", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "SOLVER.NO_SUCH_KEY" in err, err
    assert not (tmp_path / "run").exists()


def test_validate_ok_prints_a_summary(dataset, capsys):
    ann, images = dataset
    assert main(["validate", "--annotations", str(ann), "--images", str(images), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 12 images") and "3 folds" in out


def test_usage_error_exits_2_in_a_real_process(tmp_path):
    proc = _cli("run", "-k", "3")  # --annotations missing
    assert proc.returncode == 2 and "--annotations" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_is_fast_and_does_not_import_heavy_packages():
    code = ("import sys; from kfold_ray._cli import build_parser; build_parser();"
            "print(sorted(m for m in ('ray', 'torch', 'detectron2', 'cleanlab') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_every_dataset_problem_on_its_own_line_up_to_fifty(tmp_path, capsys):
    ann, images = make_coco(tmp_path / "data", n_images=70, size=(16, 16))
    for i in range(60):
        (images / f"img_{i:05d}.png").unlink()
    for command in (["validate"], ["run", "--run-dir", str(tmp_path / "run"), "-k", "3"]):
        code = main([*command, "--annotations", str(ann), "--images", str(images)])
        lines = capsys.readouterr().err.splitlines()
        assert code == 2 and len(lines) == 51, lines
        assert all(line.startswith("kfold-ray: error: ") for line in lines)
        assert [re.search(r"images\[(\d+)\]", line).group(1) for line in lines[:50]] == [str(i) for i in range(50)]
        assert lines[0] == f'kfold-ray: error: {ann}: images[0] (id 1): file "img_00000.png" not found under image root {images}'
        assert lines[50] == "kfold-ray: error: ... and 10 more problems"
        assert not (tmp_path / "run").exists()


def test_two_problems_are_two_lines(dataset, capsys):
    ann, images = dataset
    (images / "img_00002.png").unlink()
    edit_coco(ann, lambda d: d["annotations"][1].update(bbox=[0, 0, -2, 2]))
    assert main(["validate", "--annotations", str(ann), "--images", str(images)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "annotations[1]" in lines[0] and "images[2]" in lines[1], lines


def test_validate_exclude_unreadable(dataset, capsys):
    ann, images = dataset
    (images / "img_00003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (images / "img_00005.png").unlink()
    assert main(["validate", "--annotations", str(ann), "--images", str(images)]) == 2
    assert capsys.readouterr().err.count("\n") == 2
    with pytest.warns(UserWarning, match="excluded 2 images"):
        code = main(["validate", "--annotations", str(ann), "--images", str(images), "--exclude-unreadable"])
    assert code == 0 and capsys.readouterr().out.startswith("ok: 10 images")


@pytest.mark.parametrize("where", ["unknown scheme", "missing bucket", "bad credentials",
                                   "unreachable endpoint"])
def test_bad_run_dir_storage_exits_2_before_any_fold_starts(where, dataset, tmp_path, s3, monkeypatch):
    import os

    ann, images = dataset
    env = dict(os.environ)
    run_dir = {"unknown scheme": "nosuch://bucket/run", "missing bucket": "s3://no-such-bucket-kfold/run",
               "bad credentials": s3.uri("run"), "unreachable endpoint": s3.uri("run")}[where]
    if where == "bad credentials":
        # moto checks keys only when asked to: a server of its own that does
        from clusters import S3Server

        monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        server = S3Server().start()
        env.update({**server.env, "AWS_ACCESS_KEY_ID": "nope", "AWS_SECRET_ACCESS_KEY": "nope"})
    if where == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard port: nothing answers
    try:
        done = subprocess.run([sys.executable, "-m", "kfold_ray._cli", "run", "--annotations", str(ann),
                               "--images", str(images), "-k", "2", "--model", "tiny", "--run-dir",
                               run_dir, "--address", "local"], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)
    finally:
        if where == "bad credentials":
            server.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("kfold-ray: error: run dir ") and "run" in done.stderr
    assert {"unknown scheme": "cannot open storage with scheme 'nosuch'",
            "missing bucket": "the bucket does not exist",
            "bad credentials": "access denied: check the credentials",
            "unreachable endpoint": "cannot reach the storage endpoint"}[where] in done.stderr
    assert "Ray cluster" not in done.stderr, "no cluster may be started for bad input"
    assert list(tmp_path.iterdir()) == [tmp_path / "data"], "nothing written locally"


def test_every_flag_has_a_help_line_with_its_default():
    """What a new user reads in --help: each flag says what it does, and each that takes a value
    its default; the default model is named with its schedule."""
    import argparse

    from kfold_ray._cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"run", "validate", "example", "report", "export", "apply", "doctor"}
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{flag} has no help"
            takes_value = action.nargs != 0 and action.option_strings
            if takes_value and not action.required:
                assert "default" in action.help, f"{flag}: its help names no default"
    run_help = commands["run"].format_help()
    assert "faster_rcnn_R_50_FPN_3x.yaml" in run_help and "270,000 iterations" in run_help
    assert "--in-sample" in run_help
    assert "130" in parser.format_help()


def test_run_passes_in_sample_through(monkeypatch, dataset, tmp_path):
    from kfold_ray import _api

    seen = {}

    def fake_run_cv(*args, **kwargs):  # only what the CLI hands over is checked here
        seen.update(kwargs)
        raise _api.ConfigError("stop here")

    monkeypatch.setattr(_api, "run_cv", fake_run_cv)
    ann, images = dataset
    assert main(["run", "--annotations", str(ann), "--images", str(images), "--in-sample"]) == 2
    assert seen["in_sample"] is True
    assert main(["run", "--annotations", str(ann), "--images", str(images)]) == 2
    assert seen["in_sample"] is False


def test_validate_warns_of_unusable_masks_without_failing(tmp_path, capsys):
    ann, images = make_coco(tmp_path / "data", n_images=6, segmentation="polygon")
    edit_coco(ann, lambda d: d["annotations"][2].update(segmentation=[[1, 2, 3]]))
    assert main(["validate", "--annotations", str(ann), "--images", str(images)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kfold-ray: warning: 1 segmentation cannot be used")
    assert "annotations[2]" in err and "MODEL.MASK_ON" in err


def test_a_second_example_reports_the_finished_run_or_says_what_to_do(ray_local, tmp_path, capsys):
    from fakes import EchoBackend

    from kfold_ray import run_cv
    from kfold_ray._api import example_data
    from kfold_ray.data._example import EXAMPLE_MODEL, example_overrides

    run_dir = tmp_path / "example"
    data = example_data(str(run_dir), n_images=30)
    # A finished example run, made fast: the example's config, an echoing backend.
    run_cv(data.annotations, 3, image_root=data.image_root, model=EXAMPLE_MODEL,
           overrides=example_overrides(), gpus_per_fold=0, run_dir=run_dir, backend=EchoBackend(),
           progress=False)
    ray_local.shutdown()
    assert main(["example", "--run-dir", str(run_dir), "--images", "30"]) == 0
    out = capsys.readouterr().out
    assert f"{run_dir} already holds this finished example run: reporting it again" in out
    assert "label issues: the 3 injected errors" in out
    assert main(["example", "--run-dir", str(run_dir), "--images", "30", "-k", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "made with other options" in err and "--run-dir" in err, err
    state = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**state, "status": "running"}))
    assert main(["example", "--run-dir", str(run_dir), "--images", "30"]) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished example run: finish it with `kfold-ray example --resume`" in err, err
