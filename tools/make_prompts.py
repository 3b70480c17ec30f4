"""Write an interpretive prompt bank by asking an LLM (OpenAI-compatible chat endpoint).

For every class of a label list and every prompt kind (action decomposition, body
parts, synonyms, scene: CLAVER §2) this asks the endpoint for ``--n`` variants, each
one chat completion with our own few-shot prompt (``FEW_SHOT`` below), cleans every
reply (one sentence, de-duplicated, within CLIP's 77-token context without cutting a
sentence, else asked again) and writes the bank format of docs/prompts.md.

    export OPENAI_API_KEY=...            # as for any OpenAI client; local servers ignore it
    python -m tools.make_prompts labels/ucf101.csv --out prompts/ucf101.json \\
        --base-url http://127.0.0.1:8080/v1 --model smollm2 --n 5

Every accepted text is appended to a cache (``BANK.json.cache.jsonl`` by default) the
moment it arrives, so an interrupted run (Ctrl-C, a crash, a lost endpoint) re-run
with the same arguments asks only for what is missing; raising ``--n`` later asks only
for the new variants. Requests run ``--concurrency`` at a time; the OpenAI client
retries connection errors, 429 and 5xx with exponential back-off (``--retries``).
The last line printed on stdout is a JSON summary (requests, cached, rejected...).
Exit status: 0 bank written, 1 error (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from claver_dist.text.prompts import (
    CONTEXT_LENGTH, KINDS, LabelsError, count_tokens, load_labels, readable_name, save_bank,
)

SYSTEM = (
    "You describe human actions for a video recognition system. Answer with exactly one "
    "plain sentence of at most 30 words about the given action. No list, no title, no "
    "quotes, no preamble."
)

# Our few-shot prompt texts: one instruction per kind and two worked examples. The
# example actions are deliberately outside the usual benchmarks' names, so the model
# imitates the form, not a memorised answer. Their hash goes into the provenance.
FEW_SHOT: dict[str, dict] = {
    "decomposition": {
        "instruction": "Explain how this action is made of simpler actions, in order.",
        "examples": [
            ("kneading dough", "A person presses the dough down with the heels of both hands, "
                               "folds it over, turns it a quarter and presses again."),
            ("pitching a tent", "Someone lays out the tent, slides poles through the sleeves, "
                                "raises the frame and pegs the corners into the ground."),
        ],
    },
    "body_parts": {
        "instruction": "Name the body parts that move in this action and how they move.",
        "examples": [
            ("kneading dough", "The palms and wrists push forward while the shoulders lean "
                               "in and the fingers fold the dough back."),
            ("pitching a tent", "The arms stretch up to lift the poles, the back bends and the "
                                "hands hammer pegs while the knees kneel."),
        ],
    },
    "synonyms": {
        "instruction": "Say the same action with other words or phrases that mean the same.",
        "examples": [
            ("kneading dough", "Working the dough, pressing and folding bread dough by hand."),
            ("pitching a tent", "Setting up a tent, putting up a shelter, erecting a tent at a campsite."),
        ],
    },
    "scene": {
        "instruction": "Describe where this action usually takes place and what is around.",
        "examples": [
            ("kneading dough", "A floured kitchen counter or bakery table with a bowl, "
                               "a rolling pin and bags of flour nearby."),
            ("pitching a tent", "A grassy campsite or forest clearing with backpacks, "
                                "trees and a fire pit around."),
        ],
    },
}

# Replies that talk about the task instead of doing it.
_OFF_FORMAT = re.compile(
    r"\b(as an ai|language model|i cannot|i can't|i'm sorry|sorry,|here is|here's|"
    r"sure[,!]|certainly[,!])", re.I)
_LEADING_LABEL = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)]|answer:|sentence:|description:|output:)\s*", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def prompt_hash() -> str:
    blob = json.dumps({"system": SYSTEM, "few_shot": FEW_SHOT}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def build_messages(action: str, kind: str) -> list[dict[str, str]]:
    spec = FEW_SHOT[kind]
    messages = [{"role": "system", "content": SYSTEM}]
    for example, answer in spec["examples"]:
        messages.append({"role": "user", "content": f"Action: {example}\nTask: {spec['instruction']}"})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": f"Action: {action}\nTask: {spec['instruction']}"})
    return messages


def clean_reply(content: str | None, truncated: bool,
                context_length: int = CONTEXT_LENGTH) -> tuple[str | None, str]:
    """One reply -> (text, "") or (None, reason). ``truncated`` says the endpoint
    stopped at max_tokens, so the last sentence may be cut and is dropped."""
    if content is None or not content.strip():
        return None, "empty"
    lines = [l.strip() for l in content.strip().splitlines() if l.strip()]
    text = _LEADING_LABEL.sub("", lines[0]).strip().strip('"\u201c\u201d\'').strip()
    if len(lines) > 1 and not re.search(r"[.!?]$", text):
        return None, "off-format"  # a list or a title line, not a sentence
    if _OFF_FORMAT.search(text):
        return None, "off-format"
    text = " ".join(text.split())
    sentences = [s for s in _SENTENCE_END.split(text) if s]
    if (truncated or len(lines) > 1) and sentences and not re.search(r"[.!?]$", sentences[-1]):
        sentences = sentences[:-1]  # a sentence cut off by max_tokens
    # Keep whole sentences while they fit CLIP's context: never cut mid-sentence.
    kept: list[str] = []
    for s in sentences:
        if count_tokens(" ".join(kept + [s])) > context_length:
            break
        kept.append(s)
    if not kept:
        return None, "too-long" if sentences else "truncated"
    text = " ".join(kept)
    if not re.search(r"[.!?]$", text):
        text += "."
    if len(re.findall(r"[A-Za-z]+", text)) < 3:
        return None, "too-short"
    return text, ""


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


@dataclass(frozen=True)
class Item:
    cls: int
    name: str
    kind: str
    variant: int


class FatalEndpointError(RuntimeError):
    """The endpoint cannot be used (unreachable, auth, unknown model): stop the run."""


class Cache:
    """Append-only JSONL of accepted texts, keyed by everything that shaped them."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.texts: dict[tuple[str, str, int], str] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill mid-write
                if rec.get("fingerprint") == fingerprint:
                    self.texts[(rec["class"], rec["kind"], rec["variant"])] = rec["text"]
        self._fh = None

    def add(self, item: Item, text: str) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        rec = {"fingerprint": self.fingerprint, "class": item.name, "kind": item.kind,
               "variant": item.variant, "text": text}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()  # survives a kill: the re-run must not ask again
        self.texts[(item.name, item.kind, item.variant)] = text

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="make_prompts", description=__doc__.split("\n\n")[0])
    ap.add_argument("labels", help="id,name CSV (labels/*.csv)")
    ap.add_argument("--out", required=True, help="bank JSON to write")
    ap.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", required=True, help="model name sent to the endpoint")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    ap.add_argument("--n", type=int, default=5, help="variants per class and kind (reference: 5)")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0, help="base seed; variant v, attempt a uses seed+v+1000*a")
    ap.add_argument("--max-tokens", type=int, default=77)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--retries", type=int, default=3, help="client retries with back-off per request")
    ap.add_argument("--attempts", type=int, default=6, help="requests per item before giving up on it")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--cache", default=None, help="resume cache (default: OUT.cache.jsonl)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N classes (trials)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in args.kinds:
        if k not in FEW_SHOT:
            ap.error(f"unknown kind '{k}' (known: {', '.join(FEW_SHOT)})")
    for flag in ("n", "concurrency", "attempts", "max_tokens"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def _make_client(args: argparse.Namespace):
    from openai import OpenAI

    # Local OpenAI-compatible servers accept any key, but the client refuses to start
    # without one: fall back to a placeholder when OPENAI_API_KEY is unset.
    return OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY") or "unused",
                  max_retries=args.retries, timeout=args.timeout)


def _ask(client, args: argparse.Namespace, item: Item, attempt: int) -> tuple[str, str, str]:
    """One request. Returns (status, text_or_reason, served_model); status is "ok",
    "rejected" (a reply that fails clean-up) or "malformed" (no usable reply)."""
    import openai

    try:
        resp = client.chat.completions.create(
            model=args.model, messages=build_messages(readable_name(item.name), item.kind),
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
            seed=args.seed + item.variant + 1000 * attempt)
    except openai.APIConnectionError as e:  # includes timeouts, after the client's retries
        raise FatalEndpointError(f"cannot reach {args.base_url}: {e.__cause__ or e}") from None
    except openai.APIStatusError as e:
        if e.status_code >= 500 or e.status_code == 429:
            raise FatalEndpointError(f"{args.base_url} keeps failing: HTTP {e.status_code} "
                                     f"after {args.retries} retries") from None
        raise FatalEndpointError(f"{args.base_url} refused the request: HTTP {e.status_code}: "
                                 f"{_short(e.message)}") from None
    except Exception as e:  # unparseable body, wrong shape: the reply is malformed
        return "malformed", f"{type(e).__name__}: {_short(str(e))}", ""
    try:
        choice = resp.choices[0]
        content, finish = choice.message.content, choice.finish_reason
    except (AttributeError, IndexError, TypeError) as e:
        return "malformed", f"no choices in reply ({type(e).__name__})", ""
    if not isinstance(content, str):
        return "malformed", "reply has no message content", ""
    text, reason = clean_reply(content, truncated=(finish == "length"))
    if text is None:
        return "rejected", reason, getattr(resp, "model", "") or ""
    return "ok", text, getattr(resp, "model", "") or ""


def _short(s: str, n: int = 160) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def write_bank(path: Path, names: list[str], kinds: list[str], n: int, texts: dict,
               provenance: dict) -> None:
    prompts = [{k: [texts[(name, k, v)] for v in range(n)] for k in kinds} for name in names]
    save_bank(path, names, prompts, provenance)


def run(args: argparse.Namespace) -> tuple[int, dict]:
    names = load_labels(args.labels)
    if args.limit is not None:
        names = names[: args.limit]
    out = Path(args.out)
    cache_path = Path(args.cache) if args.cache else out.with_name(out.name + ".cache.jsonl")
    params = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
              "max_tokens": args.max_tokens}
    fingerprint = hashlib.sha256(json.dumps(
        {"model": args.model, "prompt_sha256": prompt_hash(), **params}, sort_keys=True).encode()
    ).hexdigest()[:16]
    cache = Cache(cache_path, fingerprint)
    items = [Item(c, name, k, v) for c, name in enumerate(names) for k in args.kinds for v in range(args.n)]
    todo = [it for it in items if (it.name, it.kind, it.variant) not in cache.texts]
    stats = Counter(items=len(items), cached=len(items) - len(todo))
    reasons: Counter = Counter()
    served: set[str] = set()
    # Texts already accepted per (class, kind), for de-duplication across variants.
    accepted: dict[tuple[str, str], set[str]] = {}
    for (name, kind, _), text in cache.texts.items():
        accepted.setdefault((name, kind), set()).add(_norm(text))

    from tqdm import tqdm

    client = _make_client(args)
    bar = tqdm(total=len(items), initial=stats["cached"], unit="text", desc=out.name, leave=False,
               disable=args.no_progress, file=sys.stderr)
    failed: list[Item] = []
    pool = cf.ThreadPoolExecutor(max_workers=args.concurrency)
    pending: dict[cf.Future, tuple[Item, int]] = {}
    queue = [(it, 0) for it in todo]
    queue.reverse()  # pop() from the end: first items first
    try:
        while queue or pending:
            while queue and len(pending) < args.concurrency:
                item, attempt = queue.pop()
                pending[pool.submit(_ask, client, args, item, attempt)] = (item, attempt)
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                item, attempt = pending.pop(fut)
                status, value, model = fut.result()  # FatalEndpointError propagates
                stats["requests"] += 1
                if model:
                    served.add(model)
                if status == "ok":
                    key = _norm(value)
                    seen = accepted.setdefault((item.name, item.kind), set())
                    if key in seen:
                        status, value = "rejected", "duplicate"
                    else:
                        seen.add(key)
                        cache.add(item, value)
                        stats["accepted"] += 1
                        bar.update(1)
                        continue
                stats[status] += 1
                reasons[value if status == "rejected" else "malformed"] += 1
                if attempt + 1 < args.attempts:
                    queue.append((item, attempt + 1))  # ask again, with another seed
                else:
                    failed.append(item)
    except KeyboardInterrupt:
        stats["interrupted"] = 1
        raise
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        cache.close()
    summary = {**stats, "failed": len(failed), "reasons": dict(reasons), "cache": str(cache_path)}
    if failed:
        first = failed[0]
        summary["error"] = (f"{len(failed)} texts still missing after {args.attempts} attempts each "
                            f"(first: class {first.cls} {first.name!r}, {first.kind}); "
                            f"re-run to retry, accepted texts are cached")
        return 1, summary
    provenance = {
        "method": "LLM, few-shot chat completions by tools/make_prompts.py (one request per "
                  "variant, replies cleaned and checked against CLIP's 77-token context)",
        "model": args.model,
        "served_model": sorted(served),
        "endpoint": args.base_url,
        "parameters": {**params, "n": args.n, "kinds": args.kinds,
                       "seed_rule": "seed + variant + 1000 * attempt"},
        "prompt_sha256": prompt_hash(),
        "labels": Path(args.labels).name,
        "labels_sha256": hashlib.sha256(Path(args.labels).read_bytes()).hexdigest(),
        "date": dt.date.today().isoformat(),
        "tool": "tools/make_prompts.py",
    }
    write_bank(out, names, args.kinds, args.n, cache.texts, provenance)
    summary["bank"] = str(out)
    return 0, summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    # Ctrl-C or kill -INT stops with the cache kept, also when a script started the tool
    # with SIGINT ignored (a `&` job of a non-interactive shell), where Python installs no handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, summary = run(args)
    except LabelsError as e:
        print(f"error: bad labels file: {e}", file=sys.stderr)
        return 1
    except FatalEndpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: accepted texts are cached; re-run the same command to continue",
              file=sys.stderr)
        return 130
    summary["seconds"] = round(time.monotonic() - start, 1)
    if code:
        print(f"error: {summary['error']}", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
