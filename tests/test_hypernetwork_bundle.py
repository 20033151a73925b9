"""Hypernetworks into and out of bundles: the error corpus (bad files, bad requests, exact messages), the CLI,
and the promises around the bundle (a failed add leaves it as it was, two adds at once both land, remove)."""
from __future__ import annotations

import json
import pickle
import re
import shutil
import zipfile

import pytest
import torch
from hypernet_files import write_a1111
from test_cli import run

import sdrt
from sdrt.errors import InvalidRequest, PickleRefused


def _evil_pickle(path):
    """A torch-zip .pt whose pickle calls os.system: the restricted unpickler must refuse it, not run it."""
    class Evil:
        def __reduce__(self):
            return (__import__("os").system, ("echo pwned > /dev/null",))

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({768: Evil()}))


def test_bad_files_are_refused_with_what_to_do(hn, tmp_path):
    from sdrt.export import add_hypernetwork
    from sdrt.export.hypernet_file import read_hypernetwork

    sd1, sd2 = hn["sd1"], hn["sd2"]
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        read_hypernetwork(sd1["file"])
    _evil_pickle(tmp_path / "evil.pt")
    with pytest.raises(InvalidRequest, match="refusing to load posix.system|refusing to load os.system"):
        read_hypernetwork(tmp_path / "evil.pt", allow_pickle=True)
    write_a1111(tmp_path / "soft.pt", [32], activation="relu")
    data = torch.load(tmp_path / "soft.pt", weights_only=True)
    corrupt = {
        "unknown_act": ({**data, "activation_func": "softmax"}, "uses activation 'softmax', which sdrt does not know"),
        "bad_chain": ({**data, 32: ({"linear.0.weight": torch.zeros(64, 32), "linear.0.bias": torch.zeros(64),
                                     "linear.1.weight": torch.zeros(32, 48), "linear.1.bias": torch.zeros(32)},
                                    data[32][1])}, "width 32 K: a Linear takes 48 features where 64 arrive"),
        "bad_key": ({**data, 32: ({"linear.0.scale": torch.zeros(3)}, data[32][1])}, "unexpected entry 'linear.0.scale'"),
        "not_pair": ({**data, 32: torch.zeros(3)}, "width 32 holds a tensor, not a (K, V) pair"),
        "empty": ({"activation_func": "relu"}, "holds no modules"),
        "nan": ({**data, 32: ({k: v * float("nan") for k, v in data[32][0].items()}, data[32][1])}, "NaN or Inf"),
    }
    for name, (content, message) in corrupt.items():
        torch.save(content, tmp_path / f"{name}.pt")
        with pytest.raises(InvalidRequest, match=re.escape(message)):
            read_hypernetwork(tmp_path / f"{name}.pt", allow_pickle=True)
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({768: ({}, {})}))  # torch < 1.6's plain pickle
    with pytest.raises(InvalidRequest, match=r"not in torch's zip format \(torch >= 1.6\); re-save it with torch.save"):
        read_hypernetwork(tmp_path / "legacy.pt", allow_pickle=True)
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(InvalidRequest, match="is not a .pt file"):
        read_hypernetwork(tmp_path / "x.safetensors", allow_pickle=True)
    shutil.copy(sd1["file"], tmp_path / "bad name.pt")
    with pytest.raises(InvalidRequest, match="has characters other than"):
        read_hypernetwork(tmp_path / "bad name.pt", allow_pickle=True)
    # A file for the other family: SD1's text module (48) on SD2's model (text 40), as 768 on SD 2.x.
    shutil.copy(sd1["file"], tmp_path / "other_family.pt")
    before = (sd2["bundle"] / "sdrt.json").read_bytes()
    with pytest.raises(InvalidRequest, match=r"widths \[32, 48, 64\].*text width 40: it was made for another model"):
        add_hypernetwork(sd2["bundle"], tmp_path / "other_family.pt", allow_pickle=True, log=lambda *_: None)
    write_a1111(tmp_path / f"{sd2['name']}.pt", [32, 40], seed=9)  # the bundle's name, another file
    with pytest.raises(InvalidRequest, match="already has a hypernetwork named 'sd2_style' from another file"):
        add_hypernetwork(sd2["bundle"], tmp_path / f"{sd2['name']}.pt", allow_pickle=True, log=lambda *_: None)
    assert (sd2["bundle"] / "sdrt.json").read_bytes() == before  # nothing was changed
    assert sorted(p.name for p in (sd2["bundle"] / "unet/hypernet").iterdir()) == \
        ["sd2_style.cpu.onnx", "sd2_style.onnx", "sd2_style.onnx_data"]
    add_hypernetwork(sd2["bundle"], sd2["file"], allow_pickle=True, log=lambda *_: None)  # the same file: no-op
    assert (sd2["bundle"] / "sdrt.json").read_bytes() == before
    sdrt.Pipeline.load(sd2["bundle"])  # hashes still check


def test_bad_requests_are_refused_with_what_to_do(hn):
    pipe, name = hn["sd1"]["pipe"], hn["sd1"]["name"]
    cases = [
        ({"prompt": "a <hypernet:nope:1>"}, "hypernetwork 'nope' is not in this bundle (it has: sd1_style); add its "
                                            "file with `sdrt hypernetwork add BUNDLE FILE.pt`"),
        ({"prompt": f"a <hypernet:{name}> <hypernet:{name}:0.5>"}, f"the prompt names a hypernetwork twice "
                                                                   f"(<hypernet:{name}:1> and <hypernet:{name}:0.5>)"),
        ({"prompt": f"a <hypernet:{name}:lots>"}, "has strength 'lots', not a finite number"),
        ({"prompt": f"a <hypernet:{name}:0.5>", "hypernetwork": "other"},
         f"the prompt asks for several hypernetworks, <hypernet:{name}:0.5> and <hypernet:other:1>; A1111 applies "
         f"them one after the other, which needs them baked as a stack in this order: `sdrt hypernetwork add "
         f"BUNDLE {name}.pt other.pt --allow-pickle --stack`"),
        ({"prompt": "a", "hypernetwork": (name, float("inf"))}, "not a finite number"),
        ({"prompt": "a", "hypernetwork": 3}, "hypernetwork must be a name, 'name:strength' or (name, strength)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidRequest) as e:
            pipe.txt2img(steps=1, **kwargs)
        assert message in str(e.value)


def test_export_refuses_two_files_of_one_name_before_any_work(hn, tmp_path):
    from sdrt.export import export_bundle

    (tmp_path / "a").mkdir()
    shutil.copy(hn["sd1"]["file"], tmp_path / "a" / "same.pt")
    shutil.copy(hn["sd1"]["file"], tmp_path / "same.pt")
    with pytest.raises(InvalidRequest, match="two hypernetwork files are named 'same'"):
        export_bundle(hn["sd1"]["src"], tmp_path / "out", hypernetworks=[tmp_path / "same.pt", tmp_path / "a/same.pt"],
                      allow_pickle=True)
    assert not (tmp_path / "out").exists()


def test_cli_adds_lists_and_generates(hn, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(hn["sd2"]["bundle"], bundle)
    file = tmp_path / "ink.pt"
    write_a1111(file, [32, 40, 64], activation="tanh", seed=5)
    code, _, err = run(capsys, "hypernetwork", "add", bundle, file)
    assert code == PickleRefused.exit_code and "--allow-pickle" in err and err.count("\n") == 1
    code, out, err = run(capsys, "hypernetwork", "add", bundle, file, "--allow-pickle")
    assert code == 0, err
    assert "added hypernetwork 'ink'" in out and "checks passed" in err
    code, out, _ = run(capsys, "info", bundle)
    assert code == 0 and "hypernetwork ink: ink.pt" in out and "hypernetwork sd2_style" in out
    png = tmp_path / "out.png"
    code, out, err = run(capsys, "generate", "a cat", "--model", bundle, "--out", png, "--steps", "2", "--seed", "1",
                         "--hypernetwork", "ink:0.6")
    assert code == 0, err
    from PIL import Image

    assert Image.open(png).text["parameters"].startswith("a cat <hypernet:ink:0.6>\n")
    code, _, err = run(capsys, "generate", "a cat", "--model", bundle, "--out", tmp_path / "no.png",
                       "--hypernetwork", "missing")
    assert code == 2 and err.startswith("error: hypernetwork 'missing' is not in this bundle (it has: ink, sd2_style)")
    assert not (tmp_path / "no.png").exists()


def test_a_failed_add_leaves_the_bundle_as_it_was(hn, tmp_path, monkeypatch):
    """Fault injected where real parts can't fail on demand: the disk fills while the manifest is written."""
    from sdrt.errors import OutputNotWritable
    from sdrt.export import add_hypernetwork
    from sdrt.export import bundle_edit as module  # where the manifest is written

    bundle = tmp_path / "bundle"
    shutil.copytree(hn["sd1"]["bundle"], bundle)
    before = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*"))
    file = tmp_path / "late.pt"
    write_a1111(file, [32, 48], seed=7)

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "atomic_write_bytes", full)
    with pytest.raises(OutputNotWritable, match="No space left on device.*the bundle was left as it was"):
        add_hypernetwork(bundle, file, allow_pickle=True, log=lambda *_: None)
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.name != ".sdrt.lock") == before
    assert "late" not in sdrt.Pipeline.load(bundle).manifest.hypernetworks


def test_two_adds_at_once_both_land(hn, tmp_path):
    """The bundle lock: without it both would read the same manifest and the second write would drop the first."""
    import threading

    from sdrt.export import add_hypernetwork

    bundle = tmp_path / "bundle"
    shutil.copytree(hn["sd1"]["bundle"], bundle)
    files = [tmp_path / f"{name}.pt" for name in ("first", "second")]
    for i, file in enumerate(files):
        write_a1111(file, [32, 48], seed=20 + i)
    errors = []

    def add(file):
        try:
            add_hypernetwork(bundle, file, allow_pickle=True, log=lambda *_: None)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert set(sdrt.Pipeline.load(bundle).manifest.hypernetworks) == {"sd1_style", "first", "second"}


def test_cli_export_refuses_a_pickle_before_any_work(hn, tmp_path, capsys):
    code, _, err = run(capsys, "export", hn["sd1"]["src"], "--out", tmp_path / "out", "--hypernetwork", hn["sd1"]["file"])
    assert code == PickleRefused.exit_code and "--allow-pickle" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_remove_takes_it_out_and_leaves_a_valid_bundle(hn, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(hn["sd2"]["bundle"], bundle)
    code, out, err = run(capsys, "hypernetwork", "remove", bundle, "sd2_style")
    assert code == 0, err
    m = sdrt.Pipeline.load(bundle).manifest  # every listed file still matches its hash
    assert not m.hypernetworks and not any("hypernet" in k for k in [*m.graphs, *m.cpu_graphs, *m.files])
    raw = json.loads((bundle / "sdrt.json").read_text())
    assert "hypernetworks" not in raw and not any("hypernet" in k for k in raw["verification"]["errors"])
    assert not (bundle / "unet" / "hypernet").exists()
    code, _, err = run(capsys, "hypernetwork", "remove", bundle, "sd2_style")
    assert code == 2 and err == f"error: {str(bundle)!r} has no hypernetwork 'sd2_style' (it has: none)\n"
