"""The CUDA and torchrun paths, checked on the CPU: what each path decides and builds,
with the CUDA calls stood in for where a GPU would be needed. Fast: no training run."""

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d

import models

CUDA = torch.device("cuda")  # (a device object only: nothing here runs on it)


# ---------------------------------------------------------------- 1. synchronised BatchNorm

@pytest.mark.parametrize("device", [CUDA, torch.device("cpu")])
def test_sync_batchnorm_keeps_the_activations_of_timm_batchnormact(monkeypatch, device):
    """test_efficientnet's BatchNorm layers are timm's BatchNormAct2d (BatchNorm + SiLU in one module):
    converted for torchrun, on CUDA (timm's conversion) as on the CPU (cpu_sync_batchnorm), the model
    computes the same function in eval mode, with the same parameters."""
    monkeypatch.setattr(models, "world_size", lambda: 2)
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=5).eval()
    assert sum(isinstance(m, BatchNormAct2d) for m in model.modules()) > 0
    for m in model.modules():  # running statistics away from (0, 1), so that every layer matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    params = {n: p for n, p in model.named_parameters()}
    converted = models.sync_batchnorm(model, device)
    with torch.no_grad():
        after = converted(x)
    assert torch.equal(before, after)
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "BatchNormAct2d" not in kinds and ("SyncBatchNormAct" in kinds or "CpuSyncBatchNormAct" in kinds)
    assert {n: p for n, p in converted.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in converted.named_parameters())  # the same tensors: optimisers still fit


# ---------------------------------------------------------------- 2. what is a Transformer (layout, drop path)

@pytest.mark.parametrize("name,kw,transformer", [
    ("test_vit", {}, True),
    ("swin_tiny_patch4_window7_224", dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), True),
    ("test_resnet", {}, False),
    ("test_efficientnet", {}, False),  # has `blocks`, as ViTs do
    ("mobilenetv3_small_050", {}, False),  # likewise
    ("densenet121", dict(growth_rate=4, block_config=(1, 1, 1, 1)), False),
])
def test_is_transformer_by_what_the_model_is(name, kw, transformer):
    model = timm.create_model(name, num_classes=0, **kw)
    assert models.is_transformer(model) is transformer
    assert models.uses_channels_last(model, CUDA) is (not transformer)
    assert models.uses_channels_last(model, torch.device("cpu")) is False


def test_cass_gives_channels_last_to_whichever_arm_is_a_cnn():
    """pretrain_cass.cass_step on "CUDA" (autocast off without a GPU: the step runs on the CPU) with the
    arms swapped, a ViT as arm 1 and a CNN as arm 2 (as --cnn test_vit --vit densenet161 would): the
    CNN gets the channels_last batch, the ViT the contiguous one."""
    from losses import CASSLoss
    from pretrain_cass import cass_step
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=8, img_size=32)
    cnn = timm.create_model("test_efficientnet", num_classes=8)
    seen = {}
    for name, m in (("vit", vit), ("cnn", cnn)):
        m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(
            name, args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (vit, cnn)]
    with pytest.warns(UserWarning, match="CUDA"):  # torch.autocast("cuda") disabled here
        cass_step(torch.randn(4, 3, 32, 32), vit, cnn, CASSLoss(), *opts, CUDA)
    assert seen == {"vit": False, "cnn": True}


def test_dino_drop_path_default_follows_the_architecture():
    import pretrain_dino as PD
    for arch, dpr in (("test_efficientnet", 0.0), ("test_vit", 0.1)):
        args = PD.get_args(["--arch", arch, "--init", "random", "--img-size", "32", "--out-dim", "16",
                            "--hidden-dim", "16", "--bottleneck-dim", "8", "--out", "unused"])
        assert PD.build_models(args, torch.device("cpu"))[2] == dpr, arch


# ---------------------------------------------------------------- 3. --norm model: constants copied once

def test_model_norm_hook_copies_its_constants_once_per_device_and_dtype(monkeypatch):
    """The hook of --norm model keeps its constants per (device, dtype): after the first forward in a
    dtype it makes no copy (on CUDA each copy from the host would block the step)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).double()
    model.pretrained_cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    models.apply_norm(model, "model")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    calls = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(a) or real_to(self, *a, **k))
    first = model(x)
    assert calls  # the first forward in float64 makes its copies
    calls.clear()
    for _ in range(3):
        assert torch.equal(model(x), first)
    assert calls == []


# ---------------------------------------------------------------- 4. Adam's state across a change of device

def conv_net(channels_last):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    return net.to(memory_format=torch.channels_last) if channels_last else net


def adam_steps(net, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8, generator=g)
        opt.zero_grad()
        (net(x) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("saved_on,resumed_on", [("cuda", "cpu"), ("cpu", "cuda")])
def test_adam_state_follows_the_device_and_layout_of_the_resumed_run(saved_on, resumed_on):
    """A checkpoint of a CUDA run (CNN in channels_last, fused Adam; the fused kernel runs on the CPU
    too) resumed by a CPU run (contiguous, unfused Adam), and the other way round: the resumed run's
    options stay its own, its moments take its parameters' layout, and its next steps are those of
    the run that saved, continued (to float rounding: fused and unfused Adam differ there)."""
    from runtime.runs import load_optimizer_state
    cuda = {"cuda": True, "cpu": False}
    saver = conv_net(cuda[saved_on])
    opt = torch.optim.Adam(saver.parameters(), lr=1e-2, fused=cuda[saved_on])
    adam_steps(saver, opt, 3, seed=1)
    saved = torch.load(_roundtrip(opt.state_dict()), weights_only=True)  # as a checkpoint file gives it back
    weights = {k: v.clone() for k, v in saver.state_dict().items()}
    adam_steps(saver, opt, 2, seed=2)  # the run that saved, continued

    resumed = conv_net(cuda[resumed_on])
    resumed.load_state_dict(weights)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2, fused=cuda[resumed_on])
    load_optimizer_state(opt2, saved)
    assert opt2.param_groups[0]["fused"] is cuda[resumed_on]
    for p in resumed.parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p][k].stride() == p.stride(), k
    adam_steps(resumed, opt2, 2, seed=2)
    for (k, a), b in zip(saver.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def _roundtrip(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ---------------------------------------------------------------- 5. run_all workers release each job's loaders

JOB = '''
import torch
from pipeline import loading

WORKERS = []


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, key):
        return torch.zeros(1)


def main(argv):
    loader = loading.make_loader(Items(), 2, shuffle=True, workers=1, generator=torch.Generator().manual_seed(0))
    for _ in loader:
        pass
    WORKERS.extend(loader._iterator._workers)  # (persistent: alive after the epoch)
    assert loading._LOADERS and all(w.is_alive() for w in WORKERS)
    return 0
'''


def test_run_all_worker_releases_the_loaders_of_a_finished_job(tmp_path, monkeypatch):
    """A job run in one of run_all's worker processes (job_runner.run_in_worker) builds a persistent
    loader with a worker process; when the job ends, the loader is forgotten and its worker stopped
    (a worker process runs many jobs: their loaders would pile up)."""
    from pipeline import loading
    from study.job_runner import run_in_worker
    (tmp_path / "loader_job.py").write_text(JOB)
    monkeypatch.syspath_prepend(str(tmp_path))
    import signal
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert run_in_worker(["loader_job.py"], tmp_path / "log.txt") == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    import loader_job
    assert loader_job.WORKERS
    assert loading._LOADERS == {}
    assert not any(w.is_alive() for w in loader_job.WORKERS)


# ---------------------------------------------------------------- 9. bench_gpu.sh's budget, benchmarks/bench.py's memory figures

def test_bench_gpu_group_limits_add_up_to_at_most_the_budget():
    import re

    from conftest import ROOT
    text = (ROOT / "bench_gpu.sh").read_text()
    budget = int(re.search(r"^BUDGET=\$\(\( (\d+) \* SCALE \)\)", text, re.M).group(1))
    named = re.search(r"^LIMITS=\(([\d ]+)\)", text, re.M)
    named = [int(v) for v in named.group(1).split()] if named else []
    limits = {}
    for value, group in re.findall(r"^\s*run (\S+) (\w+)", text, re.M):
        i = re.fullmatch(r'"\$\{LIMITS\[(\d)\]\}"', value)
        limits[group] = named[int(i.group(1))] if i else int(value)
    assert set(limits) == {"data", "steps_bs16", "steps_bs64", "compile_bs16"}
    assert sum(limits.values()) <= budget, limits


def test_bench_resets_the_peak_after_the_warm_up_and_reports_reserved_memory(monkeypatch):
    """On CUDA (stood in for: the torch.cuda calls are recorded), the peak memory statistics are reset
    after the warm-up steps, before the timed ones, and both peaks are reported."""
    from benchmarks import bench
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 5 * 2**20)
    bench.timed(lambda: events.append("step"), CUDA, warmup=2, steps=3)
    assert events == ["step", "step", "reset", "step", "step", "step"]
    assert bench.peak_memory(CUDA) == {"peak_mem_mb": 3.0, "peak_reserved_mb": 5.0}


# ---------------------------------------------------------------- 8. DINO: DDP first, then compile

def test_dino_compiles_the_ddp_wrapped_student(monkeypatch):
    """Under torchrun (DDP stood in for by a wrapper module) --compile compiles the student after it
    is wrapped, the wrapper included, and leaves its backbone uncompiled inside; the teacher (never
    wrapped) gets its backbone compiled. In one process both backbones are compiled, as before."""
    import pretrain_dino as PD

    class FakeDDP(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append(m) or m)
    args = PD.get_args(["--arch", "test_resnet", "--init", "random", "--img-size", "32", "--out-dim", "16",
                        "--hidden-dim", "16", "--bottleneck-dim", "8", "--out", "unused"])
    student, teacher, _ = PD.build_models(args, torch.device("cpu"))
    monkeypatch.setattr(PD, "wrap_ddp", lambda m, device: FakeDDP(m))
    fwd = PD.wrap_and_compile(student, teacher, torch.device("cpu"), True)
    assert isinstance(fwd, FakeDDP) and fwd.module is student
    assert compiled == [teacher.backbone, fwd]
    assert student._backbone_fn is None

    compiled.clear()
    student, teacher, _ = PD.build_models(args, torch.device("cpu"))
    monkeypatch.setattr(PD, "wrap_ddp", lambda m, device: m)  # one process
    assert PD.wrap_and_compile(student, teacher, torch.device("cpu"), True) is student
    assert compiled == [teacher.backbone, student.backbone]


# ---------------------------------------------------------------- 7. the process group's timeout

class Joined(Exception):
    """Raised by the stand-in for init_process_group: the script got that far."""


@pytest.mark.parametrize("script,flags", [("pretrain_cass", []), ("pretrain_dino", []), ("finetune", [])])
@pytest.mark.parametrize("given,minutes", [([], 60), (["--dist-timeout", "90"], 90)])
def test_dist_timeout_reaches_init_process_group(monkeypatch, script, flags, given, minutes):
    """Each training script, started as torchrun would (WORLD_SIZE=2), joins the process group with
    --dist-timeout minutes (default 60, above NCCL's 10: rank 0 alone may build the decoded cache)."""
    import datetime
    import importlib

    from runtime import distributed
    seen = {}

    def init(backend, **kwargs):
        seen.update(kwargs, backend=backend)
        raise Joined
    monkeypatch.setattr(distributed.dist, "init_process_group", init)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(Joined):
        importlib.import_module(script).main(["--device", "cpu", "--out", "unused", *flags, *given])
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=minutes)}


def test_a_run_folder_from_before_dist_timeout_resumes_with_any(tmp_path):
    """--dist-timeout changes how a run is executed, not what it computes: a run folder written
    before the flag existed, or with another value, is the same run."""
    import json

    from runtime.runs import check_out_dir
    (tmp_path / "config.json").write_text(json.dumps({"data": "synthetic", "bs": 16}))
    assert check_out_dir(tmp_path, {"data": "synthetic", "bs": 16, "dist_timeout": 90.0}, force=False) == tmp_path


def test_dist_timeout_must_be_positive(monkeypatch):
    from runtime.distributed import setup_distributed
    from runtime.errors import UserError
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--dist-timeout 0: give a positive number of minutes"):
        setup_distributed(torch.device("cpu"), 0)


# ---------------------------------------------------------------- 10. smaller: set_device, seeds, update_bn, pick_device

def test_device_cuda_n_becomes_the_current_cuda_device(monkeypatch):
    from runtime.cli import pick_device
    from runtime.errors import UserError
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert calls == [torch.device("cuda", 1)]
    assert pick_device("cuda") == CUDA and len(calls) == 1  # (no index: the current device stays)
    with pytest.raises(UserError, match="--device cuda:2: this machine has 2 CUDA device"):
        pick_device("cuda:2")
    with pytest.raises(UserError, match="--device gpu: not a device"):
        pick_device("gpu")


def test_each_process_draws_its_own_random_numbers_from_the_same_data_order(monkeypatch):
    """Under torchrun, seed_epoch gives every process the same loader generator (the data order and
    the augmentations) but its own global generators (drop path, guard noise): rank 0's are those of
    a single process."""
    from runtime import runs
    draws, orders = {}, {}
    for r in (None, 0, 1):
        monkeypatch.setattr(runs, "rank", lambda r=r: r or 0)
        g = runs.seed_epoch(3, 2)
        draws[r], orders[r] = torch.rand(4), g.initial_seed()
    assert torch.equal(draws[None], draws[0]) and not torch.equal(draws[0], draws[1])
    assert orders[None] == orders[0] == orders[1]


def test_mid_epoch_resume_restores_each_process_its_own_generators(monkeypatch):
    from runtime import runs
    states, want = [], []
    for s in (1, 2):
        torch.manual_seed(s)
        states.append(runs.rng_state())
        want.append(torch.rand(3))
    partial = {"rng": states[0], "rng_ranks": states, "sums": {"n": torch.ones(2)}, "seconds": 1.0}
    for r in (0, 1):
        monkeypatch.setattr(runs, "rank", lambda r=r: r)
        monkeypatch.setattr(runs, "is_main", lambda r=r: r == 0)
        monkeypatch.setattr(runs, "world_size", lambda: 2)
        sums, _ = runs.resume_mid_epoch(partial, torch.device("cpu"))
        assert torch.equal(torch.rand(3), want[r])
        assert torch.equal(sums["n"], torch.ones(2) if r == 0 else torch.zeros(2))


def test_swa_batchnorm_statistics_are_recomputed_under_autocast(monkeypatch):
    """The SWA BatchNorm recomputation runs under the autocast of training (CUDA's bf16 stood in for by
    the CPU's): the BatchNorm layers see the bf16 activations the weights see in training."""
    from torch.optim.swa_utils import AveragedModel

    import pretrain_cass
    monkeypatch.setattr(pretrain_cass, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    seen = []
    net[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    swa = AveragedModel(net)
    pretrain_cass.swa_batchnorm(swa, [(torch.randn(2, 3, 8, 8),)], torch.device("cpu"))
    assert seen == [torch.bfloat16]


def test_attention_maps_picks_its_device_as_the_other_scripts(monkeypatch):
    import attention_maps
    from runtime.errors import UserError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda:0: CUDA is not available"):
        attention_maps.main(["--arch", "test_vit", "--weights", "missing.safetensors", "--device", "cuda:0"])
