"""`cora eval` on a run directory made here without training: real data (`cora prepare`), a real CF
run (`cora train-cf`), a one-process CoRA model whose generator and P are exported and committed as
checkpoints with trainer.checkpoint's own stage/Uploader, as the worker group writes them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cora.config import from_dict, to_dict
from cora.fileio import open_fs
from cora.llm import LLMConfig, load_llm, resolve_answer_token
from trainer.run_eval import cf_embeddings, load_model
from cora.scoring import CoRAModel
from trainer import checkpoint as ck
from trainer.cli import main
from trainer.config import TrainConfig
from trainer.evaluate import export_trainable

from tests.cora.conftest import randomise_p

CF_DIM = 8
CF_FILES = ("cf.json", "user_embeddings.parquet", "item_embeddings.parquet", "model.safetensors")


def trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def commit(uri, staging, step, tensors, best, config):
    """A checkpoint committed exactly as the worker group commits one (rank 0's stage + Uploader)."""
    opt = {f"{n}::{k}": torch.zeros_like(t) for n, t in tensors.items() for k in ck.OPT_KEYS}
    rng = {"rank0": torch.get_rng_state(), "rank1": torch.get_rng_state()}
    state = {"loop": {"step": step}, "cursors": [None, None], "world_size": 2}
    up = ck.Uploader(uri, keep_last=10)
    up.submit(ck.stage(staging, step, (tensors, opt, rng, state), best, 0.6 if best else None, config))
    up.close()


def handmade_run(data, cf, run):
    """(TrainConfig, CoRAModel) of a run directory made by hand: RUN/config.json for DATA and CF_DIR, and the
    model it describes (seeded, P = 0), for the caller to give P values and export."""
    cfg = from_dict(TrainConfig, {
        "data": {"data_dir": str(data), "cf_dir": str(cf), "max_length": 256}, "llm": {"name": "tiny-llama"},
        "generator": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
        "run": {"run_dir": str(run)}})
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    torch.manual_seed(0)
    llm, tok = load_llm(LLMConfig(name="tiny-llama"))
    return cfg, CoRAModel(llm, resolve_answer_token(tok), CF_DIM, CF_DIM, cfg.injection, cfg.generator)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """RUN with config.json, export/ (the adapter A) and checkpoints: step 4 (A, best), step 8 (B),
    step 10 (committed, then damaged), step 12 (never committed). Returns (RUN, A, B)."""
    tmp = tmp_path_factory.mktemp("run_eval")
    data, cf, run = tmp / "data", tmp / "cf", tmp / "run"
    assert main(["prepare", "--source", "synthetic", "--out", str(data), "--users", "30", "--items", "20",
                 "--interactions", "300", "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(data), "--model", "mf", "--out", str(cf), "--dim", str(CF_DIM),
                 "--epochs", "1", "--no-progress"]) == 0
    cfg, model = handmade_run(data, cf, run)
    randomise_p(model, seed=1)
    a = trainable(model)
    randomise_p(model, seed=2)
    b = trainable(model)
    model_config = {k: to_dict(getattr(cfg, k)) for k in ("llm", "injection", "generator")}
    export_trainable(a, run / "export", dict(model_config, cf_dim=CF_DIM))
    uri, staging, saved = str(run / "checkpoints"), tmp / "staging", dict(to_dict(cfg), cf_dim=CF_DIM)
    for step, tensors, best in ((4, a, True), (8, b, False), (10, b, False)):
        commit(uri, staging, step, tensors, best, saved)
    with open(run / "checkpoints" / "step-000000010" / "trainable.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\1\2\3")
    shutil.copytree(run / "checkpoints" / "step-000000008", run / "checkpoints" / "step-000000012")
    (run / "checkpoints" / "step-000000012" / ck.MANIFEST).unlink()
    return run, a, b


def cora_eval(capsys, *argv) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    rc = main(["eval", *argv])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if rc == 0 else None, err


def scores(path) -> np.ndarray:
    return pq.read_table(path).column("score").to_numpy()


def test_the_best_checkpoint_scores_exactly_like_the_export(run, capsys):
    run, _, _ = run
    rc, exported, err = cora_eval(capsys, "--run", str(run), "--no-progress")
    assert rc == 0 and exported["source"] == "export" and exported["n"] == 30, err
    rc, best, err = cora_eval(capsys, "--run", str(run), "--checkpoint", "best", "--no-progress")
    assert rc == 0, err
    assert best["source"] == "checkpoint step-000000004"
    assert "checkpoint step-000000004 (step 4, best)" in err
    assert best["auc"] == exported["auc"] and best["uauc"] == exported["uauc"]
    np.testing.assert_array_equal(scores(run / "predictions-test-step-000000004.parquet"),
                                  scores(run / "predictions-test.parquet"))


def test_a_checkpoint_loads_exactly_its_own_tensors(run, capsys):
    run, a, b = run
    cfg = json.loads((run / "config.json").read_text())
    for which, want, name in (("latest", b, "step-000000008"), ("8", b, "step-000000008"),
                              ("step-000000004", a, "step-000000004")):
        model, _, source = load_model(run, cfg, which)
        assert source == f"checkpoint {name}"
        got = trainable(model)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), which
    err = capsys.readouterr().err
    assert "skipping" in err and "step-000000010" in err          # latest: the damaged newer one is skipped
    for which, name in (("latest", "step-000000008"), ("best", "step-000000004")):
        rc, result, _ = cora_eval(capsys, "--run", str(run), "--checkpoint", which, "--split", "valid", "--no-progress")
        assert rc == 0 and result["source"] == f"checkpoint {name}"
    # P matters: another checkpoint, other scores
    assert not np.allclose(scores(run / "predictions-valid-step-000000008.parquet"),
                           scores(run / "predictions-valid-step-000000004.parquet"))


def test_bad_requests_are_clear_errors_with_exit_code_2(run, tmp_path, capsys):
    run, _, _ = run
    rc, _, err = cora_eval(capsys, "--run", str(run), "--checkpoint", "step-000000005", "--no-progress")
    assert rc == 2 and "Traceback" not in err
    assert "no committed checkpoint step-000000005" in err
    assert "committed: step-000000004, step-000000008, step-000000010" in err
    rc, _, err = cora_eval(capsys, "--run", str(run), "--checkpoint", "step-000000012", "--no-progress")
    assert rc == 2 and "no committed checkpoint step-000000012" in err           # staged, never committed
    rc, _, err = cora_eval(capsys, "--run", str(run), "--checkpoint", "10", "--no-progress")
    assert rc == 2 and "step-000000010/trainable.safetensors" in err and "does not match the xxh3_128 in the manifest" in err
    rc, _, err = cora_eval(capsys, "--run", str(tmp_path / "nothing"), "--no-progress")
    assert rc == 2 and "is not a run directory (no config.json)" in err
    no_export = tmp_path / "no-export"
    no_export.mkdir()
    shutil.copy(run / "config.json", no_export)
    rc, _, err = cora_eval(capsys, "--run", str(no_export), "--no-progress")
    assert rc == 2 and "no export/adapter.safetensors" in err and "--checkpoint latest" in err
    rc, _, err = cora_eval(capsys, "--run", str(no_export), "--checkpoint", "best", "--no-progress")
    assert rc == 2 and "holds no committed checkpoint" in err
    rc, _, err = cora_eval(capsys, "--run", str(run), "--batch-size", "0", "--no-progress")
    assert rc == 2 and "--batch-size must be >= 1, got 0" in err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--run", str(run), "--split", "tset"])
    assert e.value.code == 2 and "invalid choice: 'tset'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: --device cuda is valid here")
def test_device_cuda_without_a_gpu_fails_before_loading_anything(tmp_path, capsys):
    rc, _, err = cora_eval(capsys, "--run", str(tmp_path / "no-run-here"), "--device", "cuda")
    assert rc == 2
    assert "--device cuda: torch.cuda.is_available() is false" in err and "use --device cpu" in err
    assert "no-run-here" not in err                                # the device was checked first


def test_progress_shows_samples_per_second_and_eta_unless_silenced(run, capsys):
    run, _, _ = run
    rc, _, err = cora_eval(capsys, "--run", str(run), "--split", "valid", "--batch-size", "8")
    assert rc == 0
    assert "eval valid" in err and "30/30" in err and "sample/s" in err
    assert "<" in err.split("30/30")[-1]                            # tqdm's [elapsed<remaining] ETA
    rc, _, err = cora_eval(capsys, "--run", str(run), "--split", "valid", "--no-progress")
    assert rc == 0 and "sample/s" not in err and "eval valid" not in err


def upload(cf_dir, uri: str) -> str:
    """A copy of a CF_DIR's files in object storage (the s3_server's bucket ``cf-bucket``)."""
    fs, root = open_fs(uri, create_buckets=True)
    fs.create_dir(root.split("/")[0])
    for name in CF_FILES:
        with fs.open_output_stream(f"{root}/{name}") as f:
            f.write(Path(cf_dir, name).read_bytes())
    return uri


@pytest.mark.parametrize("model", ["mf", "sasrec"])
def test_cf_embeddings_from_object_storage_equal_the_local_ones(model, run, tmp_path, s3_server):
    run, _, _ = run
    cfg = json.loads((run / "config.json").read_text())["data"]
    local = cfg["cf_dir"]
    if model == "sasrec":                            # user vectors from a model (load_cf), not a table
        local = str(tmp_path / "cf-sasrec")
        assert main(["train-cf", "--data", cfg["data_dir"], "--model", "sasrec", "--out", local, "--dim",
                     str(CF_DIM), "--epochs", "1", "--no-progress"]) == 0
    remote = upload(local, f"s3://cf-bucket/{tmp_path.name}/cf")
    frame = pq.read_table(Path(cfg["data_dir"], "test.parquet")).to_pandas()
    for got, want in zip(cf_embeddings(remote, frame), cf_embeddings(local, frame)):
        assert got.shape == (len(frame), CF_DIM)
        np.testing.assert_array_equal(got, want)


def test_cora_eval_reads_the_cf_dir_and_the_checkpoints_from_object_storage(run, tmp_path, s3_server, capsys):
    run, a, _ = run
    cfg = json.loads((run / "config.json").read_text())
    remote = tmp_path / "remote-run"
    remote.mkdir()
    shutil.copytree(run / "export", remote / "export")
    cfg["data"]["cf_dir"] = upload(cfg["data"]["cf_dir"], f"s3://cf-bucket/{tmp_path.name}/cf")
    cfg["run"]["checkpoint_uri"] = f"s3://cf-bucket/{tmp_path.name}/checkpoints"
    commit(cfg["run"]["checkpoint_uri"], tmp_path / "staging", 4, a, True, dict(cfg, cf_dim=CF_DIM))
    (remote / "config.json").write_text(json.dumps(cfg))
    rc, want, _ = cora_eval(capsys, "--run", str(run), "--no-progress")
    for which, suffix in ((None, ""), ("best", "-step-000000004")):
        pick = ["--checkpoint", which] if which else []
        rc, got, err = cora_eval(capsys, "--run", str(remote), "--no-progress", *pick)
        assert rc == 0, err
        assert got["auc"] == want["auc"] and got["uauc"] == want["uauc"]
        np.testing.assert_array_equal(scores(remote / f"predictions-test{suffix}.parquet"),
                                      scores(run / "predictions-test.parquet"))
    assert f"checkpoint step-000000004 (step 4, best) in {cfg['run']['checkpoint_uri']}" in err
    cfg["data"]["cf_dir"] = f"s3://cf-bucket/{tmp_path.name}/nothing"
    (remote / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cora_eval(capsys, "--run", str(remote), "--no-progress")
    assert rc == 2 and f"s3://cf-bucket/{tmp_path.name}/nothing/item_embeddings.parquet is missing" in err



def test_cora_eval_reads_a_run_directory_in_object_storage(run, tmp_path, s3_server, capsys):
    """`cora eval --run s3://...`: config.json, export/ and checkpoints/ read from the bucket score exactly like
    the local run directory; the predictions are written into the bucket."""
    from cora.fileio import read_bytes
    run, _, _ = run
    remote = f"s3://cf-bucket/{tmp_path.name}/run"
    fs, root = open_fs(remote, create_buckets=True)
    fs.create_dir(root.split("/")[0])
    for f in [p for p in run.rglob("*") if p.is_file() and not p.name.startswith("predictions")]:
        with fs.open_output_stream(f"{root}/{f.relative_to(run).as_posix()}") as out:
            out.write(f.read_bytes())
    rc, want, _ = cora_eval(capsys, "--run", str(run), "--no-progress")
    for which, suffix in ((None, ""), ("best", "-step-000000004")):
        rc, got, err = cora_eval(capsys, "--run", remote, "--no-progress", *(["--checkpoint", which] if which else []))
        assert rc == 0, err
        assert got["auc"] == want["auc"] and got["source"] == ("export" if which is None else "checkpoint step-000000004")
        local = tmp_path / f"predictions{suffix}.parquet"
        local.write_bytes(read_bytes(f"{remote}/predictions-test{suffix}.parquet"))
        np.testing.assert_array_equal(scores(local), scores(run / "predictions-test.parquet"))
    rc, _, err = cora_eval(capsys, "--run", f"s3://cf-bucket/{tmp_path.name}/nothing", "--no-progress")
    assert rc == 2 and "is not a run directory (no config.json)" in err

# ----------------------------------------------------------------------------- a multi-domain data directory

@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    """RUN on OUT/source of a multi-domain preparation (movies and books samples, mixed), with a real MF
    CF_DIR and an export of random P; no training."""
    tmp = tmp_path_factory.mktemp("run_eval_domains")
    data, cf, run = tmp / "data", tmp / "cf", tmp / "run"
    assert main(["prepare", "--source", "synthetic", "--domains", "movies,books,items", "--target-domain", "items",
                 "--out", str(data), "--users", "20", "--items", "15", "--interactions", "120", "--no-progress"]) == 0
    assert main(["train-cf", "--data", str(data / "source"), "--model", "mf", "--out", str(cf), "--dim", str(CF_DIM),
                 "--epochs", "1", "--no-progress"]) == 0
    cfg, model = handmade_run(data / "source", cf, run)
    randomise_p(model, seed=3)
    export_trainable(trainable(model), run / "export",
                     dict({k: to_dict(getattr(cfg, k)) for k in ("llm", "injection", "generator")}, cf_dim=CF_DIM))
    return run


def reference_scores(run, domain_of) -> np.ndarray:
    """The test rows scored one at a time, each prompt built with the template ``domain_of(row)``."""
    from cora.prompts import PromptEncoder, get_template
    from cora.scoring import collate
    cfg = json.loads((run / "config.json").read_text())
    data = Path(cfg["data"]["data_dir"])
    frame = pq.read_table(data / "test.parquet").to_pandas()
    titles = pq.read_table(data / "items.parquet").column("title").to_numpy(zero_copy_only=False)
    model, tok, _ = load_model(run, cfg)
    users, items = cf_embeddings(cfg["data"]["cf_dir"], frame)
    out = []
    with torch.no_grad():
        for k, row in enumerate(frame.itertuples()):
            enc = PromptEncoder(tok, get_template(domain_of(row)), cfg["data"]["max_history"], 256)
            ids = enc.encode([titles[i] for i in row.history], titles[row.item])
            out.append(float(model(collate([ids], users[k:k + 1], items[k:k + 1], None, tok.pad_token_id))[0]))
    return np.array(out, dtype=np.float32)


def test_each_row_of_a_multi_domain_dir_is_prompted_with_its_domains_template(multi_run, capsys):
    rc, result, err = cora_eval(capsys, "--run", str(multi_run), "--no-progress", "--batch-size", "7")
    test = pq.read_table(Path(json.loads((multi_run / "config.json").read_text())["data"]["data_dir"],
                                  "test.parquet")).to_pandas()
    assert rc == 0 and result["n"] == len(test), err
    assert set(test["domain"]) == {"movies", "books"}                  # both domains are scored here
    got = scores(multi_run / "predictions-test.parquet")
    np.testing.assert_allclose(got, reference_scores(multi_run, lambda row: row.domain), atol=1e-4)
    movies_only = reference_scores(multi_run, lambda row: "movies")     # one template for all: other scores
    books = (test["domain"] == "books").to_numpy()
    assert np.abs(got[books] - movies_only[books]).min() > 1e-3
    np.testing.assert_allclose(got[~books], movies_only[~books], atol=1e-4)
