"""RAG benchmark: indexing speed and memory, query latency at 10k and 100k chunks, retrieval quality.

1. Indexing (real): Python's documentation (the quickstart corpus: pydoc topics as .rst, one markdown file of
   docstrings per stdlib module) written to files and indexed by `build_index` with the default embedder
   (all-MiniLM-L6-v2): chunks/s and peak RSS. Baseline in the same run: the embedder alone on the same chunk texts
   (chunks/s), so the ratio is what extraction, chunking and LanceDB writes cost on top of embedding.
   Then the same `build_index` again with nothing changed (the freshness check of a re-run).
2. Quality (real vectors): heuristic questions (gptsmith.rag.evaluate) from a fixed sample of that index's
   chunks, hit@1/5/10, MRR and nDCG@10 for bm25, vector, hybrid and, with --rerank DIR, hybrid+rerank.
3. Latency at 10k and 100k chunks: embedding 100k chunks with MiniLM on 2 CPU cores takes too long, so these
   tables are written directly with the index module's writer (`to_rows`, then the full-text index and the
   compaction a real `build_index` does): the real chunks repeated with every 7th word swapped for another corpus
   word, and vectors derived from the real ones (the chunk's vector plus Gaussian noise, re-normalised): cheap, and
   spread like real vectors rather than uniformly. Queries are the questions of part 2; vector and hybrid times
   include embedding the query. Baseline in the same run: brute-force numpy (one float32 matrix product and
   argpartition over the same vectors) plus the same query embedding.

    python benchmarks/bench_rag.py                       # 100 documents, 10k and 100k chunks: ~6-9 min on 2 cores
    python benchmarks/bench_rag.py --quick               # 60 documents, 2k/5k chunks: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


def write_docs(out: Path, limit: int | None) -> list[Path]:
    """The quickstart corpus as files: topics (reST-like titles) as .rst, module docstrings (markdown) as .md;
    `limit` documents evenly spread over it."""
    from gptsmith.data.embedded import python_docs

    out.mkdir(parents=True, exist_ok=True)
    docs = list(python_docs())
    if limit is not None and limit < len(docs):  # spread over the corpus: topics and modules alike
        docs = [docs[i * len(docs) // limit] for i in range(limit)]
    paths = []
    for i, text in enumerate(docs):
        path = out / f"doc{i:04d}{'.md' if text.startswith('# ') else '.rst'}"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- 1. indexing

def bench_indexing(docs: Path, index_dir: Path, embedder) -> dict:
    from gptsmith.config import RagConfig
    from gptsmith.rag.index import build_index

    rss0 = rss_mb()
    t0 = time.perf_counter()
    report = build_index([str(docs)], index_dir, RagConfig(), embedder=embedder, progress=False)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    t1 = time.perf_counter()
    again = build_index([str(docs)], index_dir, RagConfig(), embedder=embedder, progress=False)
    rerun = time.perf_counter() - t1
    assert again["chunks_embedded"] == 0, again
    return {"files": report.get("files_indexed", report["files_read"]), "chunks": report["chunks"],
            "tokens": report["tokens"], "seconds": seconds, "chunks_per_s": report["chunks"] / seconds,
            "peak_rss_mb": peak, "rss_before_mb": rss0, "skipped": len(report["skipped"]),
            "rerun_unchanged_s": rerun}


def bench_embed_only(texts: list[str], embedder) -> dict:
    t0 = time.perf_counter()
    embedder.embed(texts)
    seconds = time.perf_counter() - t0
    return {"chunks": len(texts), "seconds": seconds, "chunks_per_s": len(texts) / seconds}


# ---------------------------------------------------------------------------------------------- 2. quality

def bench_quality(index_dir: Path, embedder, n_questions: int, rerank: str | None) -> tuple[dict, list]:
    from gptsmith.rag.evaluate import evaluate, index_chunks, make_questions
    from gptsmith.rag.retrieve import Retriever

    chunks = index_chunks(index_dir)
    questions, qreport = make_questions(list(chunks.items()), max_chunks=n_questions, seed=0)
    retriever = Retriever.open(index_dir, rerank=rerank, embedder=embedder)
    report = evaluate(retriever, questions, chunks, top_k=10, has_reranker=rerank is not None)
    return {"questions": len(questions), "chunks_sampled": qreport.chunks_sampled, **report.to_json()}, questions


# ---------------------------------------------------------------------------------------------- 3. latency

def base_rows(index_dir: Path) -> dict[str, list]:
    from gptsmith.rag.index import open_table

    table = open_table(index_dir)
    cols = ["source", "heading", "start", "end", "unit", "n_tokens", "text", "vector"]
    return table.search().select(cols).limit(None).to_arrow().to_pydict()


def synthetic_index(base: dict[str, list], n: int, out: Path, embedder, seed: int = 0) -> tuple[np.ndarray, float]:
    """An index of `n` chunks derived from the real ones (see the module docstring); returns its vectors (for the
    numpy baseline) and the seconds the writes and the full-text index took."""
    from gptsmith.config import RagConfig
    from gptsmith.rag.index import FileChunks, chunking_key, ensure_text_index, open_table, to_rows, write_manifest
    from gptsmith.rag.types import Chunk

    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    base_vectors = np.asarray(base["vector"], dtype=np.float32)
    vocab = sorted({w for t in base["text"][:500] for w in t.split() if w.isalpha() and len(w) > 3})
    m = len(base["text"])
    cfg = RagConfig()
    out.mkdir(parents=True)
    write_manifest(out, [], cfg, embedder, None, stats=None)
    chunking = chunking_key(cfg)
    table = open_table(out, embedder.dim)
    t0 = time.perf_counter()
    all_vectors = []
    for lo in range(0, n, 10_000):
        files, vecs = [], []
        for j in range(lo, min(n, lo + 10_000)):
            i, copy = j % m, j // m
            words = base["text"][i].split()
            if copy:
                words = [pyrng.choice(vocab) if (k + copy) % 7 == 0 else w for k, w in enumerate(words)]
            chunk = Chunk(" ".join(words), f"{base['source'][i]}#copy{copy}", base["heading"][i], base["start"][i],
                          base["end"][i], base["unit"][i], base["n_tokens"][i])
            files.append(FileChunks(chunk.source, f"synthetic-{j}", [chunk]))
            v = base_vectors[i] + (0.15 * rng.standard_normal(base_vectors.shape[1]).astype(np.float32) if copy else 0)
            vecs.append(v / np.linalg.norm(v))
        vectors = np.stack(vecs).astype(np.float32)
        table.add(to_rows(files, vectors, chunking, embedder.dim))
        all_vectors.append(vectors)
    ensure_text_index(table, n)
    table.optimize()  # what build_index's upkeep does once small fragments pile up: compact, merge the FTS index
    return np.concatenate(all_vectors), time.perf_counter() - t0


def time_queries(fn, queries: list[str], retriever=None) -> list[float]:
    fn(queries[0])  # warm-up
    if retriever is not None:
        retriever.clear_cache()  # every query embedded anew, as a new question is
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def bench_latency(index_dir: Path, vectors: np.ndarray, embedder, queries: list[str], rerank: str | None) -> dict:
    from gptsmith.rag.retrieve import Retriever

    retriever = Retriever.open(index_dir, rerank=rerank, embedder=embedder)
    out = {}
    for mode in ("bm25", "vector", "hybrid"):
        times = time_queries(lambda q, mode=mode: retriever.search(q, top_k=10, mode=mode, rerank=False), queries,
                             retriever)
        out[mode] = {"p50_ms": pct(times, 50), "p95_ms": pct(times, 95)}
    if rerank:
        times = time_queries(lambda q: retriever.search(q, top_k=10, mode="hybrid", rerank=True), queries[:20],
                             retriever)
        out["hybrid+rerank"] = {"p50_ms": pct(times, 50), "p95_ms": pct(times, 95), "queries": len(times)}
    embed_times = time_queries(lambda q: embedder.embed([q]), queries)
    out["query_embedding"] = {"p50_ms": pct(embed_times, 50), "p95_ms": pct(embed_times, 95)}

    def brute_force(q: str) -> np.ndarray:
        scores = vectors @ embedder.embed([q])[0]
        top = np.argpartition(-scores, 50)[:50]
        return top[np.argsort(-scores[top])]

    times = time_queries(brute_force, queries)
    out["numpy_brute_force"] = {"p50_ms": pct(times, 50), "p95_ms": pct(times, 95)}
    out["vector_vs_numpy_p50"] = out["vector"]["p50_ms"] / out["numpy_brute_force"]["p50_ms"]
    out["rss_mb"] = rss_mb()
    return out


def untrained_cross_encoder(out: Path) -> str:
    """A cross-encoder of the usual reranker's shape (MiniLM-L6, 384 wide: ms-marco-MiniLM-L-6-v2's) from the
    shipped MiniLM weights with an untrained scoring head: its latency is a real reranker's, its ranking is not."""
    from sentence_transformers import CrossEncoder

    from gptsmith.rag.embed import default_model_dir

    CrossEncoder(str(default_model_dir()), num_labels=1, local_files_only=True).save(str(out))
    return str(out)


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100, help="documents indexed, spread over the 522 (0 = all)")
    ap.add_argument("--query-threads", type=int, default=1, help="torch threads while querying (indexing uses "
                    "all cores): one short query gains nothing from more, and on a busy machine loses much")
    ap.add_argument("--questions", type=int, default=300, help="heuristic questions for the quality table")
    ap.add_argument("--queries", type=int, default=200, help="queries timed per mode and size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="chunks in the latency tables")
    ap.add_argument("--rerank", default=None, help="a trained cross-encoder dir: adds the hybrid+rerank quality row")
    ap.add_argument("--rerank-latency", action="store_true",
                    help="time hybrid+rerank (20 queries, first size) with an untrained MiniLM-L6 cross-encoder: "
                         "latency only")
    ap.add_argument("--quick", action="store_true", help="60 documents, 2k and 5k chunks, 50 queries")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()
    if args.quick:
        args.docs, args.sizes, args.queries, args.questions = 60, [2000, 5000], 50, 100

    import torch

    from gptsmith.rag.embed import load_embedder

    args.docs = args.docs or None
    results: dict = {"machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()} indexing, "
                                f"{args.query_threads} querying; load average {os.getloadavg()[0]:.1f} at start",
                     "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    with tempfile.TemporaryDirectory(prefix="bench-rag-") as tmp:
        tmp = Path(tmp)
        embedder = load_embedder("default")
        paths = write_docs(tmp / "docs", args.docs)
        print(f"{len(paths)} documents, {sum(p.stat().st_size for p in paths) / 1e6:.2f} MB", flush=True)
        results["indexing"] = bench_indexing(tmp / "docs", tmp / "index", embedder)
        print(json.dumps(results["indexing"]), flush=True)
        base = base_rows(tmp / "index")
        sample = random.Random(0).sample(base["text"], min(300, len(base["text"])))
        results["embed_only"] = bench_embed_only(sample, embedder)
        results["indexing_vs_embed_only"] = (results["indexing"]["chunks_per_s"]
                                             / results["embed_only"]["chunks_per_s"])
        print(json.dumps(results["embed_only"]), flush=True)

        torch.set_num_threads(args.query_threads)
        results["quality"], questions = bench_quality(tmp / "index", embedder, args.questions, args.rerank)
        print(json.dumps(results["quality"]), flush=True)

        rerank = args.rerank or (untrained_cross_encoder(tmp / "ce") if args.rerank_latency else None)
        queries = [q.question for q in questions][:args.queries]
        results["latency"] = {}
        for k, n in enumerate(args.sizes):
            vectors, write_s = synthetic_index(base, n, tmp / f"syn{n}", embedder)
            row = bench_latency(tmp / f"syn{n}", vectors, embedder, queries, rerank if k == 0 else None)
            row["write_and_fts_index_s"] = write_s
            results["latency"][n] = row
            print(n, json.dumps(row), flush=True)
            del vectors
    results["peak_rss_mb"] = peak_rss_mb()
    results["load_average_end"] = os.getloadavg()[0]
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def print_tables(r: dict) -> None:
    ix, eo = r["indexing"], r["embed_only"]
    print(f"\n## indexing ({r['machine']})\n")
    print("| measure | value |\n|---|---:|")
    print(f"| files / chunks / tokens | {ix['files']} / {ix['chunks']:,} / {ix['tokens']:,} |")
    print(f"| `build_index` chunks/s (extract, chunk, embed, write, FTS index) | {ix['chunks_per_s']:.1f} |")
    print(f"| embedder alone on the same chunks, chunks/s | {eo['chunks_per_s']:.1f} |")
    print(f"| ratio (indexing / embedding alone) | {r['indexing_vs_embed_only']:.2f}x |")
    print(f"| peak RSS after indexing | {ix['peak_rss_mb']:.0f} MB |")
    print(f"| re-run with nothing changed | {ix['rerun_unchanged_s']:.2f} s |")
    q = r["quality"]
    print(f"\n## quality: {q['questions']} heuristic questions, top-k 10\n")
    print("| setting | hit@1 | hit@5 | hit@10 | MRR | nDCG@10 | p50 ms |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, m in q["modes"].items():
        print(f"| {name} | {m['hit@1']:.3f} | {m['hit@5']:.3f} | {m['hit@10']:.3f} | {m['mrr']:.3f} | "
              f"{m['ndcg@10']:.3f} | {m['p50_ms']:.1f} |")
    print("\n## latency (ms), synthetic tables\n")
    print("| chunks | bm25 p50/p95 | vector p50/p95 | hybrid p50/p95 | rerank p50/p95 | query embedding p50 | "
          "numpy brute force p50 | vector / numpy |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, row in r["latency"].items():
        cell = lambda k: f"{row[k]['p50_ms']:.1f} / {row[k]['p95_ms']:.1f}" if k in row else "-"  # noqa: E731
        print(f"| {int(n):,} | {cell('bm25')} | {cell('vector')} | {cell('hybrid')} | {cell('hybrid+rerank')} | "
              f"{row['query_embedding']['p50_ms']:.1f} | {row['numpy_brute_force']['p50_ms']:.1f} | "
              f"{row['vector_vs_numpy_p50']:.2f}x |")
    print(f"\npeak RSS of the whole run: {r['peak_rss_mb']:.0f} MB; load average at the end "
          f"{r['load_average_end']:.1f}")


if __name__ == "__main__":
    main()
