"""Pack videos into webdataset shards that the CLAVER loaders read (``claver_dist.data``).

    python tools/make_shards.py ANNOTATIONS --root VIDEO_DIR --labels LABELS_CSV \\
        --out shards/k400 --split train [--codec h264|vp9] [--copy] [--short-side 256]

ANNOTATIONS is a list file (``relative/path.ext label_id`` lines, ids 0-based), a
Kinetics-400/600/700 CSV, UCF-101's ``trainlistNN.txt``/``testlistNN.txt`` (with
``classInd.txt`` beside them), HMDB-51's ``testTrainMulti_7030_splits`` folder (with
``--split-id N --subset train|test``), Something-Something v2's
``something-something-v2-{train,validation}.json`` (with ``labels.json`` beside them), or a
folder with one sub-folder per class. The format is detected from the name and content
(``--format`` names it); every class is mapped by name onto LABELS_CSV (``id,name``;
optional for a folder tree). Run once per split into the same OUT folder.

Captioned videos (video-text pretraining) need no labels: a CSV with ``path`` and
``caption`` columns or JSON lines ``{"path", "caption" | "captions"}`` (several captions per
video allowed, all kept), or WebVid's CSV (``videoid``, ``name``, ``page_dir``). Their
samples hold the captions in the ``.json`` metadata and no ``.cls``; a video without a
caption is rejected by name; the manifest counts captions instead of classes.

Every input is decoded in full first (not decodable, no video stream, zero frames or
truncated -> rejected with the reason). By default it is then re-encoded for fast
sparse seeking: short side at most 256 (what the 224-px recipes consume; use
``--short-side 384`` for 336-px models), constant frame rate, closed GOPs with a
keyframe every 12 frames, 8-bit yuv420p, H.264 in mp4 (``--codec vp9``: VP9 in webm,
which DALI can also decode on the CPU); ``--copy`` stores the original bytes. The
output is decoded again to store its exact frame count. Per sample the shard holds the
video, ``.cls`` (label id; none for captioned videos) and ``.json`` metadata (frames, fps,
size, duration, codec, crc32, source, and ``captions`` for captioned videos).

Samples are shuffled across shards by ``--seed`` and packed into shards of about
``--shard-size`` bytes (and at most ``--shard-samples`` samples). Every shard is written
atomically with its DALI index (``.idx``, the ``wds2idx`` format) and a build record;
re-running the same command skips finished shards and continues. ``OUT/manifest.json``
gets per-split/per-class counts, encode settings, the seed and every rejected input with
its reason. Exit status: 0 when at least one sample was written.

Each split also gets a compact index, ``OUT/{split}.index/`` (flat arrays the loaders
memory-map and share between processes; format in ``claver_dist/data/shards.py``), named
in the manifest. For a shard set built before it existed, or after editing its shard
list, ``--reindex`` writes it from the ``.idx`` files without re-encoding anything::

    python tools/make_shards.py --reindex shards/k400
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from claver_dist.data.annotations import FORMATS, Input, Options, Rejected, detect_format, read_inputs, read_labels
from claver_dist.data.shards import (FORMAT, MANIFEST, ShardError, ShardWriter, dump_json, load_manifest, sample_key,
                                     write_split_index)
from claver_dist.data.video import EncodeSettings, VideoError, encode, ffmpeg_available, probe, target_fps


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB, 1GB)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def add_annotation_args(p: argparse.ArgumentParser) -> None:
    """The options of claver_dist.data.annotations.Options; make_fewshot reads files the same way."""
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                   help="annotation format (default: detected from the name and content; docs/data.md)")
    p.add_argument("--one-based", action="store_true", help="list format: the label ids count from 1")
    p.add_argument("--class-index", default=None,
                   help="ucf101: classInd.txt, ssv2: labels.json (default: beside the annotation file)")
    p.add_argument("--split-id", type=int, default=None, help="hmdb51: the split N of *_test_splitN.txt")
    p.add_argument("--subset", choices=["train", "test"], default=None, help="hmdb51: tag 1 (train) or 2 (test)")


def annotation_options(args: argparse.Namespace) -> Options:
    return Options(fmt=args.format, split_id=args.split_id, subset=args.subset, one_based=args.one_based,
                   class_index=args.class_index)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotations", nargs="?", help="list file, UCF-101 split list, HMDB-51 split folder, SSv2 JSON, "
                                                    "Kinetics CSV, folder with one sub-folder per class, or captions "
                                                    "(CSV path,caption; JSONL; WebVid CSV)")  # fmt: skip
    p.add_argument("--reindex", metavar="OUT", default=None,
                   help="only (re)write the compact index of every split of the shard set OUT from its .idx files")
    p.add_argument("--root", default=None, help="folder the annotation paths are relative to (default: its folder)")
    p.add_argument("--labels", default=None, help="id,name CSV (optional for a class-folder tree)")
    add_annotation_args(p)
    p.add_argument("--out", default=None, help="output folder (default: shards/<annotations name>)")
    p.add_argument("--split", default="train",
                   help="split name for shard files and manifest, and the rows of a Kinetics CSV (default: train)")
    p.add_argument("--codec", choices=["h264", "vp9"], default="h264", help="re-encode codec (default: h264)")
    p.add_argument("--copy", action="store_true", help="store the original bytes instead of re-encoding")
    p.add_argument("--short-side", type=int, default=EncodeSettings().short_side,
                   help=f"downscale to this short side (0: keep; default {EncodeSettings().short_side}, what 224-px "
                        "models consume; 384 for 336-px models)")  # fmt: skip
    p.add_argument("--fps", type=float, default=0.0, help="constant output frame rate (default: the source's)")
    p.add_argument("--keyint", type=int, default=12, help="keyframe interval in frames (default 12)")
    p.add_argument("--crf", type=int, default=-1, help="quality (default: 23 for h264, 32 for vp9)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"), help="target bytes per shard (default 1GB)")
    p.add_argument("--shard-samples", type=int, default=0, help="at most this many samples per shard (0: no cap)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle across shards")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="delete this split's shards and start over")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.reindex is not None:
        if a.annotations is not None:
            p.error("--reindex takes no annotations: it reads the shard set's manifest and .idx files")
        return a
    if a.annotations is None:
        p.error("the annotations argument is required (or --reindex OUT)")
    if a.out is None:
        a.out = str(Path("shards") / Path(a.annotations).stem)
    if not re.fullmatch(r"[A-Za-z0-9_]+", a.split):
        p.error(f"--split must be letters, digits or '_' (it names files), got {a.split!r}")
    if not 1 <= a.keyint <= 250:
        p.error("--keyint must be in [1, 250]")
    return a


# --------------------------------------------------------------------------- per-input work (worker processes)


def process(job: tuple[Input, str, str, dict]) -> dict:
    """Validate (and re-encode) one input -> shard components, or a rejection reason."""
    inp, key, class_name, enc = job
    settings = EncodeSettings(**enc)
    try:
        src_info = probe(inp.path, threads=1)
        if settings.codec == "copy":
            data = inp.path.read_bytes()
            info, cfr, keyint = src_info, False, 0
        else:
            with tempfile.TemporaryDirectory(prefix="make_shards_") as tmp:
                out = Path(tmp) / f"v.{settings.ext()}"
                encode(inp.path, out, src_info, settings, threads=1)
                data = out.read_bytes()
            try:
                info = probe(data, threads=1)
            except VideoError as e:
                raise VideoError(f"re-encoded output unusable: {e}") from e
            cfr, keyint = True, settings.keyint
    except VideoError as e:
        return {"rejected": str(e), "source": inp.rel}
    except OSError as e:
        return {"rejected": f"cannot read: {e}", "source": inp.rel}
    fps = target_fps(src_info.fps, settings) if cfr else info.fps
    labelled = {"label": inp.label, "class_name": class_name} if inp.label >= 0 else {"captions": list(inp.captions)}
    meta = {
        "key": key, **labelled, "source": inp.rel,
        "frames": info.frames, "fps": fps, "width": info.width, "height": info.height,
        "duration": round(info.frames / fps, 4) if fps else info.duration, "codec": info.codec,
        "cfr": cfr, "keyint": keyint, "bytes": len(data), "crc32": zlib.crc32(data),
        # a display rotation survives only --copy (re-encoding writes upright frames); width
        # and height are the upright size either way
        "rotation": info.rotation,
    }  # fmt: skip
    ext = settings.ext() or (inp.path.suffix[1:].lower() or "mp4")
    return {"key": key, "label": inp.label, "source": inp.rel, "ext": ext, "data": data, "meta": meta}


# --------------------------------------------------------------------------- orchestration


def _plan_hash(order: list[tuple[Input, str]], settings: EncodeSettings, args: argparse.Namespace) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([settings.to_dict(), args.seed, args.shard_size, args.shard_samples]).encode())
    for inp, key in order:
        h.update(f"{inp.rel}\t{inp.label}\t{key}\n".encode())
        if inp.captions:  # an edited caption is another plan
            h.update(json.dumps(inp.captions).encode())
    return h.hexdigest()[:16]


def _split_files(out: Path, split: str) -> list[Path]:
    pat = re.compile(rf"{re.escape(split)}-\d{{6}}\.(tar|idx|tar\.tmp|idx\.tmp)$")
    files = [f for f in out.iterdir() if pat.match(f.name)] if out.is_dir() else []
    build = out / ".build"
    if build.is_dir():
        files += [f for f in build.iterdir() if re.match(rf"{re.escape(split)}(-\d{{6}})?\.(json|plan\.json)$", f.name)]
    return files


def _finished_shards(out: Path, split: str, plan: str) -> list[dict]:
    """Build records of the finished shards 0..k-1 of a build with the same plan."""
    done = []
    while True:
        rec = out / ".build" / f"{split}-{len(done):06d}.json"
        tar = out / f"{split}-{len(done):06d}.tar"
        if not (rec.is_file() and tar.is_file() and tar.with_suffix(".idx").is_file()):
            return done
        r = json.loads(rec.read_text())
        if r.get("plan") != plan:
            return done
        done.append(r)


def build(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    labels = read_labels(args.labels) if args.labels else None
    if Path(args.annotations).exists():
        fmt = detect_format(args.annotations) if args.format == "auto" else args.format
        print(f"make_shards: reading {args.annotations} as {fmt}", file=sys.stderr)
    inputs, rejected, classes = read_inputs(args.annotations, args.root, labels, args.split, annotation_options(args))
    settings = EncodeSettings(
        codec="copy" if args.copy else args.codec, short_side=args.short_side, fps=args.fps,
        keyint=args.keyint, crf=args.crf,
    )  # fmt: skip
    if settings.codec != "copy" and not ffmpeg_available():
        raise SystemExit("ffmpeg not found: install it (apt-get install ffmpeg, or `make sysdeps`) or use --copy")
    # keys: readable, unique, independent of the seed
    inputs.sort(key=lambda i: i.rel)
    keys, used = [], set()
    for inp in inputs:
        k, n = sample_key(inp.rel), 1
        while k in used:
            n += 1
            k = f"{sample_key(inp.rel)}_{n}"
        used.add(k)
        keys.append(k)
    perm = np.random.default_rng(args.seed).permutation(len(inputs))
    order = [(inputs[i], keys[i]) for i in perm]
    plan = _plan_hash(order, settings, args)

    out.mkdir(parents=True, exist_ok=True)
    (out / ".build").mkdir(exist_ok=True)
    if args.overwrite:
        for f in _split_files(out, args.split):
            f.unlink()
    plan_file = out / ".build" / f"{args.split}.plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("plan") != plan:
        raise SystemExit(
            f"{out}: split {args.split!r} was started with other inputs or settings; "
            "re-run with --overwrite to rebuild it"
        )
    done = _finished_shards(out, args.split, plan)
    for f in _split_files(out, args.split):  # leftovers of an interrupted shard
        m = re.search(r"-(\d{6})\.", f.name)
        if m and int(m.group(1)) >= len(done):
            f.unlink()
    plan_file.write_text(json.dumps({"plan": plan, "inputs": len(order), "created": time.time()}))
    start = done[-1]["span"][1] if done else 0
    if done:
        print(f"resuming {args.split}: {len(done)} finished shards, {len(order) - start} inputs left", file=sys.stderr)

    jobs = [(inp, key, classes[inp.label] if inp.label >= 0 else "", settings.to_dict()) for inp, key in order[start:]]
    results = _run(jobs, args)
    shard, writer, records = len(done), None, list(done)
    cur: dict = {}

    def open_shard() -> None:
        nonlocal writer, cur
        writer = ShardWriter(out / f"{args.split}-{shard:06d}.tar")
        cur = {"plan": plan, "span": [pos, pos], "samples": [], "rejected": []}

    def close_shard(end: int) -> None:
        nonlocal writer, shard
        cur["span"][1] = end
        if writer is not None and writer.count:
            writer.close()
            cur["tar"], cur["bytes"] = writer.tar_path.name, writer.tar_path.stat().st_size
        else:
            if writer is not None:
                writer.abort()
            if not cur.get("rejected"):
                return
            cur["tar"], cur["bytes"] = None, 0  # only rejections: kept for resume bookkeeping
        rec = out / ".build" / f"{args.split}-{shard:06d}.json"
        rec.with_suffix(".tmp").write_text(json.dumps(cur))
        os.replace(rec.with_suffix(".tmp"), rec)
        records.append(dict(cur))
        shard += 1
        writer = None

    pos = start
    try:
        for r in results:
            if writer is None:
                open_shard()
            if "rejected" in r:
                cur["rejected"].append({"source": r["source"], "reason": r["rejected"]})
            else:
                members = {r["ext"]: r["data"], "json": dump_json(r["meta"])}
                if r["label"] >= 0:
                    members["cls"] = str(r["label"]).encode()
                writer.add(r["key"], members)
                cur["samples"].append({"key": r["key"], "label": r["label"], "source": r["source"],
                                       "frames": r["meta"]["frames"], "captions": len(r["meta"].get("captions", ()))})
            pos += 1
            full = writer.bytes >= args.shard_size or (args.shard_samples and writer.count >= args.shard_samples)
            if full:
                close_shard(pos)
        if writer is not None:
            close_shard(pos)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return _write_manifest(out, args, classes, settings, records, rejected)


def _run(jobs: list, args: argparse.Namespace):
    if args.workers > 1 and len(jobs) > 1:
        # spawn, not fork: the caller may already run threads (a fork could inherit a held lock);
        # not forkserver either, whose one server per process the CPU loader sets up for itself
        pool = mp.get_context("spawn").Pool(min(args.workers, len(jobs)))
        it = pool.imap(process, jobs, chunksize=1)
    else:
        pool, it = None, map(process, jobs)
    try:
        if not args.no_progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(jobs), desc=f"{args.split} videos", unit="video", smoothing=0.1)
        yield from it
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _write_manifest(out: Path, args: argparse.Namespace, classes: list[str], settings: EncodeSettings,
                    records: list[dict], pre_rejected: list[Rejected]) -> dict:  # fmt: skip
    path = out / MANIFEST
    manifest = load_manifest(out) if path.is_file() else {"format": FORMAT, "splits": {}}
    annotation = "labels" if classes else "captions"  # captioned formats have no classes
    if manifest.get("annotation", "labels") != annotation and manifest.get("splits"):
        raise SystemExit(f"{path}: other splits hold {manifest.get('annotation', 'labels')}, this one {annotation}; "
                         "use another --out")
    if manifest.get("classes") not in (None, classes):
        raise SystemExit(f"{path}: other splits were built with different classes; use another --out")
    shards, per_class, captions = [], {c: 0 for c in classes}, []
    rejected = [{"source": r.source, "reason": r.reason} for r in pre_rejected]
    for rec in records:
        rejected += rec["rejected"]
        if rec.get("tar"):
            tar = rec["tar"]
            shards.append({"tar": tar, "idx": tar[:-4] + ".idx", "samples": len(rec["samples"]), "bytes": rec["bytes"]})
        for s in rec["samples"]:
            if s["label"] >= 0:
                per_class[classes[s["label"]]] += 1
            else:
                captions.append(s.get("captions", 0))
    total = sum(s["samples"] for s in shards)
    counts = ({"per_class": per_class} if annotation == "labels" else
              {"captions": {"total": sum(captions), "per_video_min": min(captions, default=0),
                            "per_video_max": max(captions, default=0)}})
    manifest["splits"][args.split] = {
        "num_samples": total,
        "num_shards": len(shards),
        **counts,
        "shards": shards,
        **({"index": write_split_index(out, args.split, shards)} if shards else {}),
        "encode": settings.to_dict(),
        "seed": args.seed,
        "annotations": str(args.annotations),
        "rejected": rejected,
    }
    manifest.update(
        format=FORMAT,
        annotation=annotation,
        classes=classes,
        num_classes=len(classes),
        seed=args.seed,
        encode=settings.to_dict(),
        rejected=[dict(r, split=s) for s, sp in sorted(manifest["splits"].items()) for r in sp["rejected"]],
    )
    _save_manifest(path, manifest)
    return manifest


def _save_manifest(path: Path, manifest: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def reindex(folder: Path) -> int:
    """Write the compact index of every split of an existing shard set, and name it in the manifest."""
    manifest = load_manifest(folder)
    for split, entry in sorted(manifest.get("splits", {}).items()):
        if not entry.get("shards"):
            entry.pop("index", None)
            continue
        t0 = time.perf_counter()
        entry["index"] = write_split_index(folder, split, entry["shards"])
        print(f"{folder}: split {split}: compact index of {entry['index']['num_samples']} samples written to "
              f"{entry['index']['path']} in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    _save_manifest(folder / MANIFEST, manifest)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reindex is not None:
        try:
            return reindex(Path(args.reindex))
        except (ValueError, OSError) as e:  # ShardError is a ValueError
            print(f"make_shards: error: {e}", file=sys.stderr)
            return 2
    try:
        manifest = build(args)
    except (ValueError, OSError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    sp = manifest["splits"][args.split]
    caps = f", {sp['captions']['total']} captions" if "captions" in sp else ""
    print(f"{args.out}: split {args.split}: {sp['num_samples']} samples{caps} in {sp['num_shards']} shards, "
          f"{len(sp['rejected'])} rejected")  # fmt: skip
    for r in sp["rejected"]:
        print(f"  rejected {r['source']}: {r['reason']}")
    return 0 if sp["num_samples"] else 1


if __name__ == "__main__":
    sys.exit(main())
