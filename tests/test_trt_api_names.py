"""sdrt's TensorRT and cuda-python calls checked against the real Python bindings of the versions it supports,
on a machine with no GPU, where those bindings can't run (TensorRT's can't even be imported without libnvinfer,
a GB wheel).

Supported, from pyproject's gpu extra (tensorrt>=10, cuda-python>=12), doctor's and build's "TensorRT >= 10",
and trt_engine.py/build.py, written for TensorRT 10 and 11 with fallbacks back to 10.0, and for 8.6-9 (weakly
typed, the FP16 builder flag; the README and doctor's MIN_TRT admit them):
- TensorRT 8.6.1 (tensorrt-bindings, the only pre-10 bindings on the index), 10.0.1 (the first 10.x release on the index: sdrt keeps 10.0 fallbacks), 10.16.1.11 (the newest
  10.x, tensorrt-cu12-bindings) and 11.4.0.106 (the newest 11.x, tensorrt-cu13-bindings). Their names are read
  from the pybind11 module's strings (trt_api_names.Names, which says why whole strings and tails).
- cuda-bindings 12.9.10 and 13.5.0, the newest of each major cuda-python installs. They import without a GPU,
  so sdrt's attribute chains are resolved (qualified, `cudaMemcpyKind.cudaMemcpyHostToDevice`) in a subprocess
  importing the extracted wheel; test_trt_runtime.py's tests of the installed bindings are run on each too.

What sdrt uses comes from its source (trt_api_names.Collector: data flow from the imports, no list of names).
Checked: a name sdrt reaches unconditionally exists in every version; a name behind a version fallback
(getattr/hasattr probe, a branch on one, try/except AttributeError) exists in at least one, and on each version
the branch that runs has what it needs. Wheels are downloaded once to $XDG_CACHE_HOME (or ~/.cache)
/sdrt/test-bindings; with no index the tests skip.
"""
from __future__ import annotations

import ast
import json
import platform
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from binding_wheels import Names, Unreachable, tensorrt_names, wheels
from trt_api_names import Api, Collector, required

ROOT = Path(__file__).resolve().parents[1]
TENSORRT = {"8.6.1": "tensorrt-bindings", "10.0.1": "tensorrt-cu12-bindings", "10.16.1.11": "tensorrt-cu12-bindings",
            "11.4.0.106": "tensorrt-cu13-bindings"}
CUDA_BINDINGS = ("12.9.10", "13.5.0")
# strongly_typed: build.network_flags()'s answer (True on every TensorRT >= 10 with STRONGLY_TYPED); trt_major:
# the major version. Branches on them are version branches whose side the AST can't tell.
TRT_API = Api(("tensorrt",), through_calls=True, gates=frozenset({"strongly_typed", "trt_major"}))
CUDA_API = Api(("cuda.bindings.runtime", "cuda.cudart"), through_calls=False,
               results={"cudaGetDeviceProperties": ("cudaDeviceProp()",)})
# Names used only on the `not strongly_typed` side of a gate (TensorRT < 10), and why that side never runs
# on a version lacking them (test_gated_names_are_only_missing_where_their_branch_cannot_run checks this).
GATED_PRE_10 = {"FP16": "build.trt_build sets BuilderFlag.FP16 only when not strongly_typed"}


def sdrt_sources() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted((ROOT / "sdrt").rglob("*.py"))}


@pytest.fixture(scope="module")
def trt_versions() -> dict[str, Names]:
    out = {}
    for version, package in TENSORRT.items():
        try:
            (wheel,) = wheels(package, version)
        except Unreachable as e:
            pytest.skip(str(e))
        out[version] = tensorrt_names(wheel, f"TensorRT {version}")
    return out


@pytest.fixture(scope="module")
def trt_collector() -> Collector:
    return Collector(TRT_API, sdrt_sources())


@pytest.fixture(scope="module")
def trt_uses(trt_collector):
    return trt_collector.uses()


def always_missing(uses, versions: dict) -> list[str]:
    """Uses that run on a version (unconditionally, or on a branch its probes select) lacking the name."""
    return [f"{u} -> {u.name!r} missing in {v}" for u in uses if not u.probe and u.fallback is None
            for v, names in versions.items() if required(u, names) is True and u.name not in names]


def nowhere(uses, versions: dict) -> list[str]:
    """Guarded uses (probes, version branches, try alternatives) whose name no version has: a typo."""
    return [f"{u} -> {u.name!r} in none of {', '.join(versions)}" for u in uses
            if u.guarded and not any(u.name in names for names in versions.values())]


def try_gaps(uses, versions: dict) -> list[str]:
    """try/except AttributeError pairs where, on some version, neither side has all it needs."""
    groups = {}
    for u in uses:
        if u.fallback:
            groups.setdefault(u.fallback[0], {"try": [], "except": []})[u.fallback[1]].append(u)
    out = []
    for sides in groups.values():
        for v, names in versions.items():
            need = {k: [u for u in us if required(u, names) is not False] for k, us in sides.items()}
            if all(any(u.name not in names for u in us) for us in need.values()):
                out.append(f"{v}: neither {[str(u) for u in need['try']]} nor {[str(u) for u in need['except']]}")
    return out


def test_binding_names_are_read(trt_versions):
    """The reader finds what every TensorRT defines, and nothing made up: an empty or wrong set can't pass."""
    for names in trt_versions.values():
        assert len(names.exact) > 1000, names.label
        for n in ("Builder", "Runtime", "ILogger", "deserialize_cuda_engine", "BuilderFlag", "OnnxParser",
                  "execute_async_v3", "num_io_tensors", "__version__"):
            assert n in names, f"{n} not found in {names.label}"
        assert "NoSuchThing" not in names and "trt" not in names.exact


def test_reader_tells_10_from_11(trt_versions):
    """Known differences, so the names can't all come from docstrings or another version."""
    v86, v100, v10, v11 = (trt_versions[v] for v in ("8.6.1", "10.0.1", "10.16.1.11", "11.4.0.106"))
    assert "STRONGLY_TYPED" not in v86 and "ExecutionContextAllocationStrategy" not in v86 and "FP16" in v86
    assert "create_execution_context_without_device_memory" in v10 and "FP16" in v10
    assert "create_execution_context_without_device_memory" not in v11 and "FP16" not in v11
    assert "EXPLICIT_BATCH" in v10 and "EXPLICIT_BATCH" not in v11
    assert "device_memory_size_v2" not in v100 and "set_device_memory" not in v100
    assert "device_memory_size_v2" in v10 and "device_memory_size_v2" in v11
    for names in (v100, v10, v11):
        assert "USER_MANAGED" in names and "ExecutionContextAllocationStrategy" in names


def test_collector_finds_sdrt_uses(trt_collector, trt_uses):
    """What the walk collects: the calls of each TensorRT object and no Python-side names (sdrt's own
    Engine.run_padded, a version string's .lower, a logger's .errors)."""
    names = {u.name for u in trt_uses}
    assert {"Builder", "create_network", "parse_from_file", "set_memory_pool_limit", "build_serialized_network",
            "serialize", "deserialize_cuda_engine", "get_tensor_profile_shape", "set_input_shape",
            "set_tensor_address", "execute_async_v3", "USER_MANAGED", "set_device_memory", "log",
            "__version__"} <= names
    assert not names & {"run_padded", "lower", "rsplit", "errors", "values", "inputs", "engine", "activate"}
    assert trt_collector.gates_seen == TRT_API.gates, "a gate in TRT_API is no longer in sdrt: update it"
    print(f"\n{len(trt_uses)} TensorRT uses, {len(names)} names:")
    for u in sorted(trt_uses, key=lambda u: (u.file, u.line)):
        print(f"  {u.file}:{u.line} {u.name}{' (probe)' if u.probe else ''}{' (guarded)' if u.guarded else ''}")


@pytest.mark.parametrize("version", TENSORRT)
def test_unconditional_tensorrt_names_exist(version, trt_versions, trt_uses):
    missing = always_missing(trt_uses, {version: trt_versions[version]})
    assert not missing, "sdrt uses TensorRT names this version lacks:\n" + "\n".join(missing)


def test_fallback_tensorrt_names_exist_somewhere(trt_versions, trt_uses):
    bad = nowhere(trt_uses, trt_versions)
    assert not bad, "\n".join(bad)


def test_try_fallbacks_cover_every_tensorrt(trt_versions, trt_uses):
    """try/except AttributeError fallbacks (none in sdrt today; the walk's handling of them is checked on the
    sample source in test_checks_catch_a_made_up_name_and_a_broken_fallback)."""
    gaps = try_gaps(trt_uses, trt_versions)
    assert not gaps, "\n".join(gaps)


def test_gated_names_are_only_missing_where_their_branch_cannot_run(trt_versions, trt_uses):
    """A branch on strongly_typed can't be evaluated here: a name it uses may be missing only where
    network_flags() gives strongly_typed=True (every version has STRONGLY_TYPED and is >= 10)."""
    for u in trt_uses:
        lacking = [v for v, names in trt_versions.items() if required(u, names) is None and u.name not in names]
        if lacking and not u.probe:  # a probe may be missing anywhere (EXPLICIT_BATCH: gone in 11)
            assert u.name in GATED_PRE_10, f"{u} -> {u.name!r} missing in {lacking}, behind a gate"
    for names in trt_versions.values():  # where network_flags() says weakly typed, the gated side has its names
        if "STRONGLY_TYPED" not in names:
            assert all(n in names for n in (*GATED_PRE_10, "EXPLICIT_BATCH")), names.label


def test_numpy_dtype_table_names_tensorrt_types(trt_versions):
    from sdrt.runtime.engines.trt_engine import TRT_TO_NUMPY

    newer = {"INT64"}  # TensorRT 8.6 has no INT64 tensors, so no 8.6 engine has one to look up
    for names in trt_versions.values():
        missing = [n for n in TRT_TO_NUMPY if n not in names]
        assert set(missing) <= newer and (not missing or "STRONGLY_TYPED" not in names), (names.label, missing)


SAMPLE = '''
import tensorrt as trt

def build(trt, x):
    cfg = trt.Builder(x).create_builder_config()
    cfg.set_flag(trt.NoSuchThing.FP16)
    if hasattr(trt, "Newer"):
        trt.Newer.go()
    strategy = getattr(trt, "Strategy", None)
    if strategy is None:
        return cfg.old_context()
    try:
        cfg.new_way()
    except (AttributeError, TypeError):
        cfg.old_way = 1
    engine, pad = pick(cfg)
    return engine.run_padded(pad), strategy.USER

def caller():
    return build(load(), 1)

def load():
    import tensorrt
    return tensorrt
'''


def test_checks_catch_a_made_up_name_and_a_broken_fallback():
    """The collector and checks on a small source and two made-up versions: the test can fail."""
    uses = Collector(TRT_API, {"sample.py": SAMPLE}).uses()
    names = {u.name for u in uses}
    assert names == {"Builder", "create_builder_config", "set_flag", "NoSuchThing", "FP16", "Newer", "go",
                     "Strategy", "old_context", "new_way", "old_way", "USER"}  # no run_padded: not TensorRT's
    old = Names("old", {"Builder", "create_builder_config", "set_flag", "FP16", "old_context", "old_way"})
    new = Names("new", {"Builder", "create_builder_config", "set_flag", "FP16", "Newer", "go", "Strategy", "USER",
                        "new_way"})
    missing = always_missing(uses, {"old": old, "new": new})
    assert sorted(m.split(" -> ")[1] for m in missing) == ["'NoSuchThing' missing in new",
                                                           "'NoSuchThing' missing in old"]
    assert not nowhere(uses, {"old": old, "new": new}) and not try_gaps(uses, {"old": old, "new": new})
    broken = Names("broken", {"Builder", "create_builder_config", "set_flag", "Strategy", "Newer"})
    gaps = {m.split(" -> ")[1] for m in always_missing(uses, {"broken": broken})}
    assert {"'go' missing in broken", "'USER' missing in broken", "'FP16' missing in broken"} <= gaps
    assert "'old_context' missing in broken" not in gaps  # Strategy exists: that branch doesn't run
    assert try_gaps(uses, {"broken": broken}) == [
        "broken: neither ['sample.py:13 cfg.new_way'] nor ['sample.py:15 cfg.old_way']"]
    assert {m.split(" -> ")[1] for m in nowhere(uses, {"broken": broken, "old": old})} == {
        "'go' in none of broken, old", "'new_way' in none of broken, old", "'USER' in none of broken, old"}


def test_names_reads_whole_strings_and_their_tails():
    names = Names("x", {"CONDITIONAL_INPUT", "Builder"})
    assert "INPUT" in names and "Builder" in names and "FP16" not in names and "Build" not in names


# ---- cuda-python

RESOLVE = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from cuda.bindings import runtime as rt
found = {}
for chain in json.load(sys.stdin):
    obj = rt
    try:
        for part in chain:
            obj = getattr(obj, part[:-2])() if part.endswith("()") else getattr(obj, part)
        found[".".join(chain)] = True
    except AttributeError:
        found[".".join(chain)] = False
print(json.dumps({"file": rt.__file__, "found": found}))
'''


@pytest.fixture(scope="module")
def cuda_sites(tmp_path_factory) -> dict[str, Path]:
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("cuda-bindings wheels are imported here: that needs Linux x86_64")
    out = {}
    for version in CUDA_BINDINGS:
        try:
            found = wheels("cuda-bindings", version, deps=True)  # with cuda-pathfinder, which it imports
        except Unreachable as e:
            pytest.skip(str(e))
        out[version] = tmp_path_factory.mktemp(f"cuda-bindings-{version}")
        for w in found:
            zipfile.ZipFile(w).extractall(out[version])
    return out


@pytest.fixture(scope="module")
def cuda_uses():
    """sdrt's cuda-python uses, and the cudaError_t member names sdrt compares error names with (strings)."""
    files = sdrt_sources()
    errors = sorted({n.value for src in files.values() for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Constant)
                     and isinstance(n.value, str) and re.fullmatch(r"cudaError[A-Z]\w*", n.value)})
    return Collector(CUDA_API, files).uses(), errors


@pytest.fixture(scope="module")
def cuda_found(cuda_sites, cuda_uses) -> dict[str, dict[str, bool]]:
    """version -> {dotted chain: resolves}, importing each extracted wheel in a fresh interpreter."""
    uses, errors = cuda_uses
    chains = [u.chain for u in uses if u.chain] + [("cudaError_t", e) for e in errors] + \
        [("cudaMalloc",), ("cudaNoSuchThing",), ("cudaError_t", "cudaErrorNoSuchError")]
    out = {}
    for version, site in cuda_sites.items():
        r = subprocess.run([sys.executable, "-I", "-c", RESOLVE, str(site)], input=json.dumps(chains),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"importing cuda.bindings.runtime from {site} failed:\n{r.stderr[-2000:]}"
        result = json.loads(r.stdout)
        assert result["file"].startswith(str(site)), f"imported {result['file']}, not the wheel under test"
        out[version] = result["found"]
    return out


@pytest.mark.parametrize("version", CUDA_BINDINGS)
def test_cuda_python_names_exist(version, cuda_found, cuda_uses):
    uses, errors = cuda_uses
    found = cuda_found[version]
    assert {"cudaMalloc", "cudaGraphLaunch", "cudaMemcpyHostToDevice", "totalGlobalMem"} <= {u.name for u in uses}
    assert "cudaErrorMemoryAllocation" in errors and "cudaErrorNoDevice" in errors
    assert found["cudaMalloc"] and not found["cudaNoSuchThing"] and not found["cudaError_t.cudaErrorNoSuchError"]
    assert all(u.chain for u in uses), [str(u) for u in uses if not u.chain]  # each use can be resolved
    have = {c.rsplit(".", 1)[-1] for c, ok in found.items() if ok}  # for the probes of version branches
    missing = [f"{u} -> {'.'.join(u.chain)}" for u in uses if not u.probe and u.fallback is None
               and required(u, have) is True and not found[".".join(u.chain)]]
    missing += [f"cudaError_t.{e} (a name sdrt compares CUDA errors with)" for e in errors
                if not found[f"cudaError_t.{e}"]]
    assert not missing, f"cuda-bindings {version} lacks:\n" + "\n".join(missing)


def test_cuda_python_fallback_names_exist_somewhere(cuda_found, cuda_uses):
    bad = [str(u) for u in cuda_uses[0] if u.guarded and not any(f[".".join(u.chain)] for f in cuda_found.values())]
    assert not bad, bad


RUN_REAL = r'''
import sys
sys.path[:0] = sys.argv[1:3]  # the extracted wheel, tests/
import pytest, test_trt_runtime as t
assert t.HAS_CUDA_PYTHON, "test_trt_runtime.py does not see the extracted cuda-python"
for name in ("test_real_cuda_python_without_a_gpu_maps_to_missing_dependency",
             "test_calls_are_accepted_by_the_real_bindings_and_fail_only_for_want_of_a_gpu"):
    try:
        getattr(t, name)()
        print("PASSED", name)
    except pytest.skip.Exception as e:
        print("SKIPPED", name, e)
'''


@pytest.mark.parametrize("version", CUDA_BINDINGS)
def test_real_binding_tests_of_test_trt_runtime_pass_on(version, cuda_sites):
    """test_trt_runtime.py's two tests of the installed cuda-python (arguments of the types it takes, its
    no-driver error), run on this version instead of skipping where cuda-python isn't installed. Called
    directly in a fresh interpreter (a pytest run would take seconds more to start)."""
    r = subprocess.run([sys.executable, "-c", RUN_REAL, str(cuda_sites[version]), str(ROOT / "tests")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    if "this machine has a GPU" in r.stdout:
        pytest.skip("this machine has a GPU: test_trt_runtime.py's no-driver tests don't apply")
    assert r.returncode == 0 and r.stdout.count("PASSED") == 2, r.stdout[-3000:] + r.stderr[-3000:]
