"""CIFAR-10's batch files in parts small enough for one device call each (a call carries 64 MiB at most).

    python results/fast_recipe/cifar_parts.py pack ../shared/data/cifar10/cifar-10-batches-py .gpu --parts 3
    python results/fast_recipe/cifar_parts.py unpack .gpu/c1 .gpu/data/cifar10/cifar-10-batches-py

pack writes DEST/c1 ... DEST/cN, each with some of the files xz-compressed (a delta filter first: neighbouring
pixels are alike, so the 176 MB become about 124 MB) and a manifest of every file's md5. unpack restores a part's
files byte for byte, checks them against the manifest, and says which files the folder still lacks.
"""
import argparse
import hashlib
import json
import lzma
import sys
from pathlib import Path

FILES = ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 6}]


def md5(data):
    return hashlib.md5(data).hexdigest()


def pack(src, dest, parts, files):
    src, dest = Path(src), Path(dest)
    manifest = {}
    for k, name in enumerate(files):
        data = (src / name).read_bytes()
        manifest[name] = md5(data)
        part = dest / f"c{k * parts // len(files) + 1}"
        part.mkdir(parents=True, exist_ok=True)
        (part / (name + ".xz")).write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, filters=FILTERS))
        print(f"{name}: {len(data)} bytes -> {part / (name + '.xz')}", flush=True)
    for k in range(parts):
        (dest / f"c{k + 1}" / "manifest.json").write_text(json.dumps(manifest, indent=1))


def unpack(part, out):
    part, out = Path(part), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((part / "manifest.json").read_text())
    for packed in sorted(part.glob("*.xz")):
        data = lzma.decompress(packed.read_bytes())
        if md5(data) != manifest[packed.stem]:
            sys.exit(f"error: {packed} does not decompress to the packed file (md5 differs); pack it again")
        (out / packed.stem).write_bytes(data)
        print(f"{packed.stem}: {len(data)} bytes, md5 checked", flush=True)
    missing = [name for name in manifest if not (out / name).exists()]
    print(f"{out}: {len(manifest) - len(missing)} of {len(manifest)} files" + (f"; still missing {', '.join(missing)}"
                                                                               if missing else ", complete"))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("src")
    p.add_argument("dest")
    p.add_argument("--parts", type=int, default=3)
    p.add_argument("--files", default=",".join(FILES), help="comma-separated names (default: all seven)")
    u = sub.add_parser("unpack")
    u.add_argument("part")
    u.add_argument("out")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        return pack(args.src, args.dest, args.parts, args.files.split(","))
    return unpack(args.part, args.out)


if __name__ == "__main__":
    sys.exit(main())
