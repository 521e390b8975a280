"""The library API the way a notebook uses it: extract, re-rank, evaluate on the demo data.

    python examples/notebook_api.py [WORKDIR]
"""

import sys
from pathlib import Path

from elvis_cli import (
    EvaluateConfig,
    FeatureStore,
    RerankConfig,
    build_shortlist,
    evaluate_dataset,
    extract_features,
    load_dataset,
    load_reranker,
    rerank,
    rerank_table,
)

DATA = Path(__file__).parent / "data"


def main(workdir: Path) -> None:
    # 1. descriptors of a folder of images (resumable; a second run does no work)
    report = extract_features(DATA / "demo" / "jpg", workdir / "feats.h5")
    print(f"extracted {report.num_extracted}, resumed {report.num_resumed}")

    # 2. all-vs-all retrieval, top 20 re-ranked by the bundled checkpoint
    with FeatureStore.open(workdir / "feats.h5") as store:
        reranker = load_reranker("elvis", store, "efficientnet-lite0")
        global_desc = store.global_descriptors()
        shortlist = build_shortlist(global_desc, global_desc, 20, exclude_self=True)
        result = rerank(reranker, store, store, shortlist, RerankConfig(shortlist=20))
        table = rerank_table(result, store.paths, store.paths)
    print(table.head(5).to_string(index=False))

    # 3. scored by the benchmark's own rules: global vs re-ranked mAP
    dataset = load_dataset(DATA, "demo")
    scores = evaluate_dataset(dataset, EvaluateConfig(shortlists=(0, 50),
                                                      features_dir=workdir / "features"))
    for row in scores.rows:
        print(f"shortlist {row['shortlist']:>3}: medium {row['map_medium']:.2f}  "
              f"hard {row['map_hard']:.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("notebook-run"))
