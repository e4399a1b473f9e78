"""RAG retrieval quality on questions in a user's words (issue 16), against a naive hybrid baseline, same run.

Corpus: Python's reference docs as pydoc ships them (pydoc_data.topics: 79 topics, one `<topic>.rst` file each).

Question sets (none made from a chunk's own words):
- hand-written: benchmarks/data/pydocs_questions.jsonl, 40 questions by source file (27 with an answer phrase),
  written once before any tuning, each marked "tune" or "report" (alternating);
- python-docs-qa: the ~110 questions of gptsmith.eval.builtin.python_docs_qa ("What does str.casefold() do?", "What
  is the "try" statement for?"), relevant = chunks of the entry's file overlapping its lines; its own fixed split:
  "qa dev" (24) to choose on, "qa test" (65) to report (the "examples" split is not used);
- teacher: `make_questions` with a local teacher (the SmolLM2-135M-Instruct dir given by --teacher) on a fixed
  sample of the product's 256-token chunks, filtered as `gptsmith rag questions` filters them; relevant = chunks of
  the same file overlapping the passage's lines (so every chunking and the baseline are judged alike); split into
  tune/report halves by chunk id.
Settings are chosen on the tune halves / dev split only; the report halves / test split are for the tables. Each
report set also gets the paired difference of gptsmith's default (hybrid) minus the naive hybrid, per question
(MRR and hit@5, 95% paired bootstrap), since the two systems answer the same questions.

Baseline (re-implemented here, as the issue's prototype was built): each topic cut at blank lines and packed into
~900-character chunks with the topic name on top, all-MiniLM-L6-v2 (the same shipped model) for vectors, Okapi
BM25 as bm25s computes it by default (k1 1.5, b 0.75, Lucene idf; words of 2+ word characters, lower-cased,
English stop words out; bm25s itself is not installed here), reciprocal rank fusion (k 60) of the top 50 of each.

Product settings: chunk size (tokens) x {bm25, vector, hybrid (defaults: RRF k 5, 20 candidates), hybrid as it was
before (k 60, 50 candidates), the vector list weighted 0.5 / 2, 50 candidates}. A cross-encoder row needs a
trained cross-encoder; none ships offline, so --rerank DIR adds it only when given.

    python benchmarks/bench_rag_quality.py --teacher /tmp/smol --json /tmp/rag_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).parent
QUESTIONS = HERE / "data" / "pydocs_questions.jsonl"
NAIVE_CHARS = 900
STOP = frozenset("""a an and are as at be but by for if in into is it no not of on or such that the their then there
these they this to was will with what which who how why when where do does can i my me you your""".split())


def write_topics(out: Path) -> list[Path]:
    import pydoc_data.topics

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in sorted(pydoc_data.topics.topics.items()):
        (out / f"{name}.rst").write_text(text, encoding="utf-8")
        paths.append(out / f"{name}.rst")
    return paths


# ---------------------------------------------------------------------------------------------- naive baseline

def naive_chunks(path: Path):
    """Blank-line paragraphs packed into ~NAIVE_CHARS characters, the topic name on top; line ranges kept so the
    same relevance judges it."""
    from gptsmith.rag.types import Chunk

    lines = path.read_text(encoding="utf-8").split("\n")
    paras, cur, start = [], [], 1
    for i, line in enumerate(lines, 1):
        if line.strip():
            if not cur:
                start = i
            cur.append(line)
        elif cur:
            paras.append((start, i - 1, "\n".join(cur)))
            cur = []
    if cur:
        paras.append((start, len(lines), "\n".join(cur)))
    chunks, pack = [], []
    for para in paras:
        if pack and sum(len(p[2]) for p in pack) + len(para[2]) > NAIVE_CHARS:
            chunks.append(pack)
            pack = []
        pack.append(para)
    if pack:
        chunks.append(pack)
    return [Chunk(f"{path.stem}\n" + "\n\n".join(p[2] for p in pack), path.as_posix(), "", pack[0][0], pack[-1][1])
            for pack in chunks]


def bm25s_tokens(text: str) -> list[str]:
    return [w for w in re.findall(r"(?u)\b\w\w+\b", text.lower()) if w not in STOP]


class NaiveRetriever:
    """The prototype: numpy BM25 + MiniLM cosine, fused by RRF; `.search` as Retriever's, for `evaluate`."""

    def __init__(self, chunks, embedder, k1=1.5, b=0.75, rrf_k=60, candidates=50):
        from gptsmith.rag.types import Hit  # noqa: F401 - checked importable before the long run

        self.chunks, self.embedder, self.k1, self.b = chunks, embedder, k1, b
        self.rrf_k, self.candidates = rrf_k, candidates
        self.vectors = embedder.embed([c.text for c in chunks])
        docs = [bm25s_tokens(c.text) for c in chunks]
        self.tf = [Counter(d) for d in docs]
        self.len = np.array([len(d) for d in docs], dtype=np.float64)
        df = Counter(w for d in self.tf for w in d)
        n = len(docs)
        self.idf = {w: np.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        self.avg = self.len.mean()

    def clear_cache(self):
        pass

    def _bm25(self, query):
        scores = np.zeros(len(self.chunks))
        for w in set(bm25s_tokens(query)):
            if w not in self.idf:
                continue
            tf = np.array([d.get(w, 0) for d in self.tf], dtype=np.float64)
            scores += self.idf[w] * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * self.len / self.avg))
        order = [i for i in np.argsort(-scores, kind="stable")[:self.candidates] if scores[i] > 0]
        return [(i, float(scores[i])) for i in order]

    def _vector(self, query):
        sims = self.vectors @ self.embedder.embed([query])[0]
        return [(int(i), float(sims[i])) for i in np.argsort(-sims, kind="stable")[:self.candidates]]

    def search(self, query, top_k=10, mode="hybrid", **_):
        from gptsmith.rag.types import Hit

        if mode == "hybrid":
            fused = Counter()
            for found in (self._bm25(query), self._vector(query)):
                for rank, (i, _) in enumerate(found, 1):
                    fused[i] += 1 / (self.rrf_k + rank)
            ranked = sorted(fused.items(), key=lambda x: -x[1])
        else:
            ranked = self._bm25(query) if mode == "bm25" else self._vector(query)
        return [Hit(self.chunks[i], s, r, {}, str(i)) for r, (i, s) in enumerate(ranked[:top_k], 1)]


# ---------------------------------------------------------------------------------------------- runs

def split_questions(records, key) -> dict[str, list]:
    out = {"tune": [], "report": []}
    for r in records:
        out[key(r)].append(r)
    return out


def qa_sets(tmp: Path) -> dict[str, list]:
    """python-docs-qa's dev and test items as `rag eval` question records."""
    from gptsmith.eval.builtin import python_docs_qa
    from gptsmith.eval.builtin.python_docs import topics
    from gptsmith.rag.evaluate import read_questions

    items = python_docs_qa.build_items(topics())
    out = {}
    for split in ("dev", "test"):
        path = tmp / f"qa-{split}.jsonl"
        records = python_docs_qa.retrieval_records([it for it in items if it["meta"]["split"] == split])
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        out[f"qa {split}"] = read_questions(path)
    return out


PER_QUESTION: dict = {}  # (index name, set, setting) -> per-question metrics, for the paired comparison


def run_settings(retriever, sets, chunks, settings, top_k=10, index_name=""):
    from gptsmith.rag.evaluate import evaluate

    out = {}
    for set_name, questions in sets.items():
        if not questions:
            continue
        rep = evaluate(retriever, questions, chunks, top_k=top_k, match="overlap", settings=settings)
        out[set_name] = {m.name: {**{k: round(v, 4) for k, v in m.metrics.items()},
                                  "ci95": {k: [round(x, 3) for x in v] for k, v in m.ci95.items()},
                                  "p50_ms": round(m.p50_ms, 1), "p95_ms": round(m.p95_ms, 1)} for m in rep.modes}
        out[set_name]["_unmatched"] = len(rep.unmatched)
        for m in rep.modes:
            PER_QUESTION[(index_name, set_name, m.name)] = m.per_question
    return out


def paired(ours: str, base: str, set_name: str, setting: str = "hybrid", base_setting: str = "hybrid") -> dict:
    """One setting minus another on the same questions: mean difference and 95% paired interval."""
    from gptsmith.eval.stats import paired_diff_ci

    a, b = PER_QUESTION[(base, set_name, base_setting)], PER_QUESTION[(ours, set_name, setting)]
    out = {"questions": len(a)}
    for metric in ("mrr", "hit@5"):
        d, lo, hi = paired_diff_ci([q[metric] for q in a], [q[metric] for q in b])
        out[metric] = [round(d, 3), round(lo, 3), round(hi, 3)]
    return out


def product_settings(rerank: bool) -> list[tuple[str, dict]]:
    out = [("bm25", {"mode": "bm25", "rerank": False}), ("vector", {"mode": "vector", "rerank": False}),
           ("hybrid", {"mode": "hybrid", "rerank": False}),  # the defaults: rrf_k 5, 20 candidates, weights 1
           ("hybrid k60 c50 (before)", {"mode": "hybrid", "rerank": False, "rrf_k": 60, "candidates": 50})]
    out += [(f"hybrid w{w}", {"mode": "hybrid", "rerank": False, "vector_weight": w}) for w in (0.5, 2.0)]
    out += [("hybrid c50", {"mode": "hybrid", "rerank": False, "candidates": 50})]
    if rerank:
        out.append(("hybrid+rerank", {"mode": "hybrid", "rerank": True}))
    return out


def table(results: dict, set_name: str) -> str:
    rows = ["| index | setting | hit@1 | hit@5 | hit@5 95% | MRR | MRR 95% | nDCG@10 | p50 ms |",
            "|---|---|---:|---:|---|---:|---|---:|---:|"]
    for index_name, by_set in results.items():
        for setting, m in by_set.get(set_name, {}).items():
            if setting.startswith("_"):
                continue
            rows.append(f"| {index_name} | {setting} | {m['hit@1']:.3f} | {m['hit@5']:.3f} | "
                        f"{m['ci95']['hit@5'][0]:.2f}-{m['ci95']['hit@5'][1]:.2f} | {m['mrr']:.3f} | "
                        f"{m['ci95']['mrr'][0]:.2f}-{m['ci95']['mrr'][1]:.2f} | {m['ndcg@10']:.3f} | "
                        f"{m['p50_ms']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="local teacher model dir (e.g. the pulled SmolLM2-135M-Instruct)")
    ap.add_argument("--teacher-chunks", type=int, default=160, help="chunks the teacher writes questions for")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="chunk sizes (tokens) compared")
    ap.add_argument("--rerank", help="a trained cross-encoder dir: adds a hybrid+rerank row")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while querying")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from gptsmith.config import RagConfig
    from gptsmith.rag.embed import load_embedder
    from gptsmith.rag.evaluate import LocalTeacher, index_chunks, make_questions, read_questions
    from gptsmith.rag.index import build_index
    from gptsmith.rag.retrieve import Retriever

    results: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                     "machine": f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start"}
    hand = read_questions(QUESTIONS)
    split_of = {json.loads(line)["question"]: json.loads(line)["split"] for line in QUESTIONS.open()}
    sets = {f"hand {k}": v for k, v in split_questions(hand, lambda r: split_of[r.question]).items()}
    with tempfile.TemporaryDirectory(prefix="bench-ragq-") as tmp:
        tmp = Path(tmp)
        sets.update(qa_sets(tmp))
        docs = write_topics(tmp / "pydocs")
        embedder = load_embedder("default")
        quality: dict = {}
        indexes = {}
        for size in args.sizes:
            t0 = time.perf_counter()
            idx = tmp / f"idx{size}"
            rep = build_index([str(tmp / "pydocs")], idx, RagConfig(chunk_tokens=size, chunk_overlap=size // 8),
                              embedder=embedder, progress=False)
            indexes[size] = idx
            results[f"index {size}"] = {"chunks": rep["chunks"], "seconds": round(time.perf_counter() - t0, 1)}
            print(f"indexed {size}: {rep['chunks']} chunks", flush=True)
        if args.teacher:
            chunks256 = list(index_chunks(indexes[max(s for s in args.sizes if s <= 256)]).items())
            teacher = LocalTeacher(args.teacher, max_tokens=120)
            t0 = time.perf_counter()
            recs, qrep = make_questions(chunks256, teacher, max_chunks=args.teacher_chunks, seed=16)
            results["teacher"] = {"model": args.teacher, "chunks": qrep.chunks_sampled, "questions": qrep.records,
                                  "yield": round(qrep.yield_, 3), "skipped": dict(qrep.skipped),
                                  "rejected": dict(qrep.rejected), "seconds": round(time.perf_counter() - t0, 1),
                                  "examples": [r.question for r in recs[:12]]}
            print(json.dumps(results["teacher"]), flush=True)
            sets.update({f"teacher {k}": v for k, v in split_questions(
                recs, lambda r: "tune" if int(r.chunk_id, 16) % 2 == 0 else "report").items()})
        torch.set_num_threads(args.threads)
        naive_chunk_list = [c for p in docs for c in naive_chunks(p)]
        naive = NaiveRetriever(naive_chunk_list, embedder)
        results["naive chunks"] = len(naive_chunk_list)
        quality["naive ~900 chars"] = run_settings(
            naive, sets, {str(i): c for i, c in enumerate(naive_chunk_list)},
            [("bm25", {"mode": "bm25"}), ("vector", {"mode": "vector"}), ("hybrid", {"mode": "hybrid"})],
            index_name="naive ~900 chars")
        for size, idx in indexes.items():
            retriever = Retriever.open(idx, rerank=args.rerank, embedder=embedder)
            quality[f"gptsmith {size} tok"] = run_settings(retriever, sets, dict(retriever.chunks()),
                                                           product_settings(args.rerank is not None),
                                                           index_name=f"gptsmith {size} tok")
            print(f"evaluated {size}", flush=True)
        results["quality"] = quality
        results["paired"] = {}
        for size in indexes:
            for set_name in sets:
                if sets[set_name]:
                    ours = f"gptsmith {size} tok"
                    results["paired"][f"{ours} hybrid - naive hybrid, {set_name}"] = paired(
                        ours, "naive ~900 chars", set_name)
                    results["paired"][f"{ours} hybrid - hybrid k60 c50 (before), {set_name}"] = paired(
                        ours, ours, set_name, base_setting="hybrid k60 c50 (before)")
    results["machine"] += f", {os.getloadavg()[0]:.1f} at the end"
    for set_name in sets:
        if sets[set_name]:
            print(f"\n### {set_name} ({len(sets[set_name])} questions)\n\n{table(quality, set_name)}")
    print("\n### paired differences, same questions (mean, 95% paired interval)\n")
    for name, d in results["paired"].items():
        print(f"- {name} ({d['questions']} q): MRR {d['mrr'][0]:+.3f} [{d['mrr'][1]:+.3f}, {d['mrr'][2]:+.3f}], "
              f"hit@5 {d['hit@5'][0]:+.3f} [{d['hit@5'][1]:+.3f}, {d['hit@5'][2]:+.3f}]")
    print(f"\n{results['machine']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
