"""The GPU check must run where only torch (+ pyyaml, pillow, pandas) is installed; its evaluate
rows also need pytorch-fid, and say so where it is missing. Every bench script refuses bad input
with one line, and writes nothing into the working tree or the user's MLflow store."""
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from workspace import TINY, dvc, make_repo, set_params

from pipeline.runtime import autocast_dtype


def refused(repo_root, script: str, *args: str, timeout: float = 300, **kwargs) -> str:
    """Run bench/`script` with bad `args`: it must stop with one `error:` line, no traceback;
    returns that line."""
    res = subprocess.run([sys.executable, str(repo_root / "bench" / script), *args], cwd=kwargs.pop("cwd", repo_root),
                         capture_output=True, text=True, timeout=timeout, **kwargs)
    said = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in said, said[-3000:]
    errors = [line for line in said.splitlines() if "error:" in line]
    assert len(errors) == 1, said[-3000:]
    return errors[0]


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).parents[1] / "bench").glob("*.py")))
def test_every_bench_file_answers_help(repo_root, script):
    # the two modules the scripts import printed nothing and exited 0
    res = subprocess.run([sys.executable, str(repo_root / "bench" / script), "--help"], cwd=repo_root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr[-2000:]
    assert res.stdout.startswith(f"usage: {script} ") or f"{script} is a module the bench scripts import" in res.stdout


def test_gpu_check_imports_no_mlflow_dvc_tfrecord_or_pytorch_fid(repo_root):
    code = ("import runpy, sys; sys.argv = ['train_step.py', '--help']\n"
            "try:\n    runpy.run_path('bench/train_step.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'dvc', 'tfrecord', 'pytorch_fid'))\n"
            "print('LOADED', bad)")
    res = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert "LOADED []" in res.stdout, res.stdout[-2000:]


def test_gpu_check_says_its_evaluate_rows_need_pytorch_fid(monkeypatch, tmp_path):
    import train_step
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # as on a GPU machine without it
    rows = train_step.evaluation_rows(torch.device("cpu"), 8, tmp_path, tmp_path / "evaluate.log")
    assert rows == [("evaluate stage", {"error": "not run: needs pytorch-fid (pip install pytorch-fid==0.3.0)"})]


def test_gpu_check_runs_and_prints_table_last(repo_root, tmp_path):
    """Run from an empty folder without $OUT: its log and table go to a new temp folder, which its
    first line names, and nothing into the folder it runs in."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp)}
    res = subprocess.run([sys.executable, str(repo_root / "bench" / "train_step.py"), "--steps", "1", "--rounds", "1",
                          "--generate", "20", "--evaluate", "24"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    lines = res.stdout.strip().splitlines()
    out = Path(lines[0].removeprefix("log and table: "))
    assert out.parent == tmp
    start = max(i for i, line in enumerate(lines) if line.startswith("training step"))
    table = lines[start + 1:]
    import train_step
    train = {line[:train_step.NAME].strip(): line[train_step.NAME:].split() for line in table[:6]}
    assert list(train)[0].startswith("reference") and float(train[list(train)[0]][1]) == 1.0  # ratio to itself
    auto = "bf16" if autocast_dtype("auto", torch.device("cpu")) else "fp32"  # as the stages decide it here
    assert list(train)[1].startswith(f"pipeline ({auto}, batch 8")
    assert {"fp32", "fp32+channels_last", "bf16", "bf16+channels_last"} <= set(train)
    assert all(float(r[0]) > 0 for r in train.values())  # every mode trained
    assert table[6].startswith("generate + package, 20 images")
    assert table[7].startswith("reference generate") and table[8].startswith("pipeline generate")
    # the same images, up to JPEG rounding, and in bf16 its rounding of the network's output (about
    # one level: 0.999 measured over 7,028 images; a wrong resize or colour is tens of levels)
    assert float(table[9].split()[-1]) < (2.0 if auto == "bf16" else 1.0)
    assert table[10].startswith("evaluate stage, default recipe, 24 photos")
    first, cached = table[11].split(), table[12].split()
    assert table[11].startswith("first (features cache empty)") and table[12].startswith("cached")
    assert first[-2] == "1.00" and float(cached[-3]) > 0
    assert first[-1] == cached[-1]  # the cached features score the same images alike
    assert "features from the cache" in (out / "evaluate.log").read_text()
    assert (out / "train_step.txt").read_text().splitlines()[-1] == lines[-1]


@pytest.mark.parametrize("args", [["--recipe", "bogus"], ["--rounds", "0"], ["--steps", "-1", "--rounds", "1"],
                                  ["--steps", "0", "--rounds", "1"], ["--generate", "-4", "--steps", "1", "--rounds", "1"],
                                  ["--evaluate", "-1", "--steps", "1", "--rounds", "1"]])
def test_gpu_check_refuses_bad_arguments(repo_root, args):
    line = refused(repo_root, "train_step.py", *args)
    assert args[0] in line
    if args[1] == "bogus":
        assert "competition" in line  # the valid recipes are named


@pytest.mark.parametrize("device, compile_ok, extra", [
    ("cpu", True, ["bf16+compile"]),
    ("cuda", True, ["bf16+compile", "bf16+channels_last+compile, CUDA graphs"]),
    ("cuda", False, []),  # --no-compile
])
def test_gpu_check_measures_the_compiled_variants_where_the_recipe_compiles(device, compile_ok, extra, monkeypatch):
    """The rows are the modes they are named after (what was asked of each is recorded, not run)."""
    import train_step
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    asked = {}

    def record(p, device, dtype, reference, steps, warmup, graphs):
        asked.setdefault((p.train.compile, p.train.channels_last, dtype, reference, graphs), 0)
        return {"pairs_s": 1.0, "peak_gib": 0.0}

    monkeypatch.setattr(train_step, "pairs_per_second", record)
    p = train_step.recipe("competition", torch.device(device))
    assert p.train.compile and p.train.channels_last  # the README's command, as the GPU check runs it
    names = [name for name, _ in train_step.training_rows(p, torch.device(device), 1, 1, compile_ok)]
    assert names[2:6] == ["fp32", "fp32+channels_last", "bf16", "bf16+channels_last"]
    assert names[6:] == extra
    bf16 = torch.bfloat16
    assert ((True, False, bf16, False, False) in asked) == ("bf16+compile" in extra)
    assert ((True, True, bf16, False, True) in asked) == (len(extra) == 2)
    # the pipeline row: the recipe itself, at the precision `auto` picks here (on the CPU, fp32
    # without AMX or AVX512-BF16: this asked for bf16 and failed on such a machine)
    assert (compile_ok, True, autocast_dtype(p.precision, torch.device(device)), False, False) in asked


def test_recipe_ceiling_is_the_image_through_the_generator_size(repo_root):
    """bench/recipe.py's ceilings: at full size the images come back as they are; at 64 px a
    one-pixel stripe pattern (detail only 256 px can hold) is gone, the mean colour stays."""
    import runpy

    import torch
    through_size = runpy.run_path(str(repo_root / "bench" / "recipe.py"))["through_size"]
    stripes = torch.zeros(2, 256, 256, 3, dtype=torch.uint8)
    stripes[:, ::2] = 200
    assert torch.equal(through_size(stripes, 256, torch.device("cpu")), stripes)
    small = through_size(stripes, 64, torch.device("cpu"))
    assert small.shape == stripes.shape and small.dtype == torch.uint8
    assert small.float().std() < 2 < stripes.float().std()
    assert abs(small.float().mean() - stripes.float().mean()) < 1


def test_recipe_unsharp_mask_amplifies_fine_detail_and_keeps_the_colour(repo_root):
    """bench/recipe.py --unsharp: the ceilings' images with their fine detail amplified, more for a
    larger percent, their mean colour and shape kept."""
    import runpy

    import torch
    sharpened = runpy.run_path(str(repo_root / "bench" / "recipe.py"))["sharpened"]
    g = torch.Generator().manual_seed(0)
    soft = (torch.rand(2, 16, 16, 3, generator=g) * 100 + 80).repeat_interleave(4, 1).repeat_interleave(4, 2)
    images = soft.round().to(torch.uint8)  # 64×64 blocks of 4×4: edges every 4 px

    def detail(x):  # mean absolute difference between horizontal neighbours
        return (x[:, :, 1:].float() - x[:, :, :-1].float()).abs().mean()

    more, most = sharpened(images, 100), sharpened(images, 300)
    assert more.shape == images.shape and more.dtype == torch.uint8
    assert detail(images) < detail(more) < detail(most)
    assert abs(more.float().mean() - images.float().mean()) < 1


def test_recipe_ceilings_score_a_generator_and_the_sharpened_images(repo_root, tmp_path):
    """`bench/recipe.py --ceilings-only --unsharp P --generator FILE` on a tiny sample: a row for
    each ceiling and for the generator, each also sharpened; a ground truth at full size is 1.0."""
    from pipeline import generator_file, ingest
    from pipeline.params import load, parse

    seed = load(repo_root / "params.yaml").seed  # the bench renders the ground truth of params.yaml's seed
    ingest.ingest(parse({"seed": seed, "ingest": {"sample_photos": 12, "sample_paintings": 10, "shard_size": 8}}),
                  tmp_path / "raw", tmp_path / "shards", tmp_path / "manifest.csv", tmp_path / "cache")
    config = generator_file.config_of(parse({"image_size": 32, "train": {"gen_filters": 4, "resnet_blocks": 1}}))
    generator_file.save(generator_file.build(config), config, tmp_path / "g.pt")
    res = subprocess.run([sys.executable, str(repo_root / "bench" / "recipe.py"), "--ceilings-only", "--images", "12",
                          "--data", str(tmp_path), "--ceilings", "32,256", "--unsharp", "150",
                          "--generator", str(tmp_path / "g.pt")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = dict(line.rsplit(None, 1) for line in res.stdout.splitlines()[-6:])
    assert list(rows) == ["32 px", "32 px, unsharp 150%", "256 px", "256 px, unsharp 150%",
                          f"generator {tmp_path / 'g.pt'}", f"generator {tmp_path / 'g.pt'}, unsharp 150%"]
    assert float(rows["256 px"]) == pytest.approx(1.0) and float(rows["256 px, unsharp 150%"]) != float(rows["256 px"])


def test_recipe_options_each_change_the_default(repo_root):
    """bench/recipe.py measures each option against params.yaml: none may repeat the default, and
    the old default the README's table compares with, transposed convolutions, is among them."""
    import runpy

    from pipeline.params import load
    bench = runpy.run_path(str(repo_root / "bench" / "recipe.py"))
    p = load(repo_root / "params.yaml")
    assert bench["OPTIONS"]["transpose"] == {"upsample": "transpose"}
    assert all(bench["with_train"](p, **changes) != p for changes in bench["OPTIONS"].values())


@pytest.mark.parametrize("args", [["--data", "/nonexistent"], ["--images", "0"], ["--images", "-3"],
                                  ["--ceilings", "abc"], ["--ceilings", "0"], ["--seconds", "nan"],
                                  ["--seconds", "inf"], ["--seconds", "-100"], ["--seconds", "0"],
                                  ["--unsharp", "-5"]])
def test_recipe_bench_refuses_bad_arguments(repo_root, args):
    assert args[1] in refused(repo_root, "recipe.py", *args, "--ceilings-only")


@pytest.mark.parametrize("script, args", [("recipe.py", ["--ceilings-only"]),
                                          ("train_step.py", ["--steps", "1", "--rounds", "1"])])
@pytest.mark.parametrize("text, said", [("image_size: 33\n", "'image_size' must be a multiple of 32 between 32 and 256"),
                                        ("image_size: [\n", "params.yaml is not valid YAML: ")])
def test_benches_refuse_an_invalid_params_yaml_in_one_line(repo_root, tmp_path, script, args, text, said):
    # they read the repository's params.yaml as the stages do; invalid, it was a 16-line traceback
    for folder in ("bench", "pipeline"):
        shutil.copytree(repo_root / folder, tmp_path / folder)
    shutil.copy(repo_root / "README.md", tmp_path)  # the GPU check's recipes are the README's commands
    (tmp_path / "params.yaml").write_text(text)
    line = refused(tmp_path, script, *args, cwd=tmp_path)
    assert line.startswith("error: params: ") and said in line, line


def test_a_failed_sweep_bench_leaves_no_temp_clone(repo_root, tmp_path):
    # its clone, DVC cache and store were removed only when every step succeeded
    repo = tmp_path / "repo"
    shutil.copytree(repo_root / "bench", repo / "bench")
    shutil.copy(repo_root / "params.yaml", repo)  # no dvc.yaml: `dvc repro ingest` fails in the clone
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost", "TMPDIR": str(tmp_path / "tmp")}
    subprocess.run("git init -q && git add -A && git commit -qm repo", shell=True, cwd=repo, env=env, check=True)
    (tmp_path / "tmp").mkdir()
    res = subprocess.run([sys.executable, str(repo / "bench" / "sweep.py")], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "dvc repro ingest failed" in res.stderr, res.stderr[-2000:]
    assert list((tmp_path / "tmp").glob("sweep-bench-*")) == []  # (DVC's own daemon may still hold a tmp* folder)


@pytest.mark.parametrize("args", [["--images", "-5"], ["--images", "0"], ["--rounds", "0", "--images", "8"],
                                  ["--batch-size", "0", "--images", "8"]])
def test_features_bench_refuses_bad_arguments(repo_root, args):
    assert args[0] in refused(repo_root, "features.py", *args)


def test_features_bench_prints_both_modes_and_their_agreement(repo_root):
    res = subprocess.run([sys.executable, "bench/features.py", "--images", "48", "--batch-size", "16", "--rounds", "1"],
                         cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    table = res.stdout.strip().splitlines()[-4:]
    assert table[0].startswith("mode")
    assert table[1].startswith("reference") and float(table[1].split()[-1]) == 1.0
    assert table[2].startswith("extract") and float(table[2].split()[-1]) > 0
    assert float(table[3].split()[-1]) < 1e-3  # the same features up to float32 rounding


def test_shard_memory_refuses_a_folder_that_is_no_repository(repo_root, tmp_path):
    assert "no such folder" in refused(repo_root, "shard_memory.py", "--repo", str(tmp_path / "nonexistent"))
    assert "params.yaml" in refused(repo_root, "shard_memory.py", "--repo", str(tmp_path))


def test_shard_memory_leaves_the_repository_as_it_was(repo_root, tmp_path):
    """Its stages log into a throwaway store: the repository's mlflow.db, mlartifacts/ and .cache/
    (the known hashes) are not touched."""
    root, env = make_repo(tmp_path, repo_root, TINY)
    dvc(root, env, "repro", timeout=600)

    def files() -> dict:
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}

    before = files()
    res = subprocess.run([sys.executable, "bench/shard_memory.py", "--repo", str(root)], cwd=repo_root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line.split()[0] for line in res.stdout.strip().splitlines()[-3:]] == ["train", "generate", "evaluate"]
    assert files() == before


def test_ingest_bench_refuses_an_unknown_reference(repo_root):
    assert "nosuchrev" in refused(repo_root, "ingest.py", "--reference", "nosuchrev", timeout=60)


def test_ingest_bench_refuses_other_ingest_params_than_the_reference(repo_root, tmp_path):
    """The working tree's ingest and the reference's must do the same work: a params.yaml whose
    `seed` or `ingest` differ from the reference revision's is refused before any work."""
    root, env = make_repo(tmp_path, repo_root, TINY)  # committed: the tiny sample
    set_params(root, {"seed": 1})
    assert "seed 1 (at HEAD: 0)" in refused(root, "ingest.py", "--reference", "HEAD", cwd=root, env=env)


@pytest.fixture
def chromium_env(tmp_path) -> dict:
    """An environment with a chromium on PATH (never run here) and its own temp folder, tmp_path/tmp."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "tmp").mkdir()
    (bin_dir / "chromium").write_text("#!/bin/sh\n")
    (bin_dir / "chromium").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path / "tmp")}


def test_mlflow_ui_bench_refuses_a_folder_without_a_store_and_makes_none(repo_root, tmp_path, chromium_env):
    repo = tmp_path / "repo"
    assert "no such folder" in refused(repo_root, "mlflow_ui.py", "--repo", str(repo), env=chromium_env)
    repo.mkdir()
    assert "no mlflow.db" in refused(repo_root, "mlflow_ui.py", "--repo", str(repo), env=chromium_env)
    assert list(repo.iterdir()) == []  # no empty mlflow.db made


def test_mlflow_ui_bench_removes_its_temp_folder(repo_root, tmp_path, chromium_env):
    """A store without the README's two runs: one line, and no mlflow-ui-* folder left behind."""
    repo = tmp_path / "repo"
    repo.mkdir()
    with contextlib.closing(sqlite3.connect(repo / "mlflow.db")) as con:
        con.executescript("create table experiments (experiment_id, name);"
                          "create table runs (name, run_uuid, status, start_time);")
    assert "no finished runs" in refused(repo_root, "mlflow_ui.py", "--repo", str(repo), env=chromium_env)
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("script, args", [("repro.py", []), ("sweep.py", []), ("sweep.py", ["--threads", "0"])])
def test_clone_benches_refuse_bad_arguments_before_cloning(repo_root, tmp_path, script, args):
    """--keep DIR whose DIR/repo exists (git clone would fail on it), --threads 0: one line, nothing cloned."""
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "mine").write_text("")
    line = refused(repo_root, script, *args, "--keep", str(tmp_path), timeout=120)
    assert (args[0] if args else "exists already") in line
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["mine"]


def test_sweep_bench_fails_unless_each_experiment_made_one_finished_row(repo_root, tmp_path):
    import runpy
    rows_problem = runpy.run_path(str(repo_root / "bench" / "sweep.py"))["rows_problem"]
    db = tmp_path / "mlflow.db"
    assert rows_problem(db).startswith("error: no MLflow store")

    def add(run: str, cycle: str, status: str) -> None:
        with contextlib.closing(sqlite3.connect(db)) as con:
            con.executescript("create table if not exists runs (run_uuid, status);"
                              "create table if not exists params (run_uuid, key, value);")
            con.execute("insert into runs values (?, ?)", (run, status))
            con.execute("insert into params values (?, 'lambda_cycle', ?)", (run, cycle))
            con.commit()

    for run, cycle in enumerate(("3", "5", "4")):
        add(str(run), cycle, "FINISHED")
    add("3", "6", "FAILED")
    assert rows_problem(db).startswith("error: not one finished MLflow row per experiment")
    add("4", "6", "FINISHED")
    assert rows_problem(db) is None
    add("5", "3", "FINISHED")  # a second row of one experiment
    assert rows_problem(db).startswith("error:")
