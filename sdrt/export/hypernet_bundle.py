"""`sdrt hypernetwork add` and `remove`: hypernetwork variants into and out of a bundle that exists, from its
graphs alone (no torch model: the modules are checked against torch, the rest against the plain U-Net).

The new files are written first and listed in sdrt.json last (atomically); removing lists them out first and
deletes them after; a flock on the bundle's `.sdrt.lock` keeps two of these from interleaving their manifest
writes. So the bundle loads, every listed file matching its hash, at every moment.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InvalidRequest, OutputNotWritable
from ..runtime import names
from ..runtime.fsutil import sha256_file
from ..runtime.manifest import FORMAT_VERSION, Manifest, load_manifest
from .bundle_edit import bundle_lock, check_feeds, write_manifest
from .hypernet_file import Hypernetwork
from .hypernetwork import bake_into, read_all, remove_variant, variant_data, variant_name


def _exported_bundle(bundle: Path) -> Manifest:
    manifest = load_manifest(bundle, verify_hashes=False)  # hashes: once, under the lock (_add_locked)
    if not manifest.hashed or not (bundle / names.UNET / names.LORA_MAP_FILE).is_file():
        raise InvalidRequest(f"{str(bundle)!r} was not exported by this sdrt (an optimum folder or an older bundle: "
                             f"no unet/{names.LORA_MAP_FILE}); export it with `sdrt export SRC --out BUNDLE "
                             "--hypernetwork FILE`")
    if manifest.format_version != FORMAT_VERSION:
        raise InvalidRequest(f"{str(bundle)!r} has format version {manifest.format_version}; re-export it with "
                             "this sdrt to add hypernetworks")
    return manifest


def add_hypernetwork(bundle: str | Path, file: str | Path, allow_pickle: bool = False, log=print) -> str:
    """Bake hypernetwork `file` into an exported bundle (`sdrt hypernetwork add`); returns its name."""
    return add_stack(bundle, [file], allow_pickle, log)


def add_stack(bundle: str | Path, files, allow_pickle: bool = False, log=print) -> str:
    """Bake `files` as one stack (A1111 applies several <hypernet:...> tags one after the other, in the
    prompt's order) into an exported bundle (`sdrt hypernetwork add --stack`); returns its name, the files'
    stems joined by "+". One file is a hypernetwork of its own."""
    bundle = Path(bundle).expanduser()
    members = read_all(files, allow_pickle, stack=True)
    if not members:
        raise InvalidRequest("give at least one hypernetwork file")
    _exported_bundle(bundle)
    name = variant_name(members)
    try:
        with bundle_lock(bundle):
            _add_locked(bundle, members, log)
    except OSError as e:  # a read-only bundle, a full disk: the manifest is written last, so it is unchanged
        raise OutputNotWritable(f"adding hypernetwork {name!r} to {str(bundle)!r} failed ({e.strerror or e}); "
                                "the bundle was left as it was. Check the free space and permissions of its "
                                "folder") from None
    return name


def _hashes(entry: dict) -> list[str]:
    return [m["sha256"] for m in entry.get("stack", [entry])]


def _add_locked(bundle: Path, members: list[Hypernetwork], log) -> None:
    manifest = load_manifest(bundle)  # under the lock (another add may have written it meanwhile), hashes checked
    name = variant_name(members)
    known = manifest.hypernetworks.get(name)
    if known is not None:
        if _hashes(known) != [hn.sha256 for hn in members]:
            raise InvalidRequest(f"{str(bundle)!r} already has a hypernetwork named {name!r} from another file "
                                 f"(sha256 {', '.join(h[:10] for h in _hashes(known))}); rename the new file")
        log(f"hypernetwork {name}: already in {bundle}")
        return
    entries = bake_into(bundle, members, check_feeds(manifest, "hypernetworks can be added"), log=log)
    try:
        manifest.graphs.update(entries["graphs"])
        manifest.cpu_graphs.update(entries["cpu_graphs"])
        manifest.hypernetworks.update(entries["hypernetworks"])
        for comp, spec in entries["graphs"].items():
            data_file = f"{names.UNET}/{variant_data(name)}"
            rels = [spec.path, entries["cpu_graphs"].get(comp), data_file]
            manifest.files.update({rel: sha256_file(bundle / rel) for rel in rels if rel})
        write_manifest(bundle, manifest, entries["errors"])
    except BaseException:  # the manifest is unchanged (atomic write): drop the unlisted files too
        remove_variant(bundle / names.UNET, name)
        raise


def remove_hypernetwork(bundle: str | Path, name: str, log=print) -> None:
    """Take hypernetwork (or stack) `name` out of a bundle (`sdrt hypernetwork remove`)."""
    bundle = Path(bundle).expanduser()
    load_manifest(bundle, verify_hashes=False)  # a bundle at all, before its lock file is made; hashes below
    try:
        with bundle_lock(bundle):
            manifest = load_manifest(bundle)
            entry = manifest.hypernetworks.get(name)
            if entry is None:
                have = ", ".join(sorted(manifest.hypernetworks)) or "none"
                raise InvalidRequest(f"{str(bundle)!r} has no hypernetwork {name!r} (it has: {have})")
            comp = entry["component"]
            gone = {manifest.graphs.pop(comp).path, manifest.cpu_graphs.pop(comp, None),
                    f"{names.UNET}/{variant_data(name)}"}
            del manifest.hypernetworks[name]
            for rel in gone:
                manifest.files.pop(rel, None)
            write_manifest(bundle, manifest, {}, dropped=comp)
            remove_variant(bundle / names.UNET, name)
    except OSError as e:
        raise OutputNotWritable(f"removing hypernetwork {name!r} from {str(bundle)!r} failed ({e.strerror or e}); "
                                "check the permissions of its folder") from None
    log(f"removed hypernetwork {name} from {bundle}")
