"""The TWiCE-Rec authors' released prompt JSON -> a dataset dir with ready-made examples.

    python -m twice.data prepare configs/data/official.yaml raw_dir=../shared/data/twice_official_sample

Files read from raw_dir (domain = the product_type, e.g. Grocery_and_Gourmet_Food):
    amazon_vocab_<D>.json                   {"1": "lower-cased title", ...}   -> items.jsonl (idx = the vocab number)
    amazon_<D>_llm_train[_sample].json        task 1, item knowledge           -> examples_task1.jsonl
    amazon_<D>_llm_train_case_2[_sample].json task 2, non-reasoning rec        -> examples_task2.jsonl
    amazon_<D>_llm_train_case_1[_sample].json task 3, reasoning rec            -> examples_task3.jsonl
    amazon_<D>_llm_test[_sample].json         test prompts with 30 candidates  -> examples_test.jsonl
                                                                               + users.jsonl, candidates_test.jsonl
What is mapped:
  - output `<think>R</think> <item_nm>T</item_nm> <item_id>ASIN</item_id>` -> `<think>R</think><item>ASIN</item>`
    (`output_raw` keeps the authors' text; `rationale` holds R). Task-1 outputs (`<item_info>`) are kept as they are.
  - `input` is the authors' exact user turn (its instruction names their tags); `history` / `candidates` /
    `target` are our item idx parsed out of it (history from `output_id`, candidates from the `[Candidate List]`
    item_id lines, target from `positive_item_id`), so tasks.py can re-render the prompt in our template.
  - items: title = the vocab title; id = the ASIN found next to that item in any prompt (history blocks are aligned
    with `output_id`, candidate blocks and task-1 records are matched by title, the target by `positive_item_id`);
    description / details from the first block that shows the item (the authors already cut them at ~300 chars).
    An item never shown with an ASIN keeps its vocab number as id (counted in stats.json).
  - users.jsonl: one user per test record, items = history + target; ratings and reviews parsed from the history
    blocks (rating words -> 1..5; the target has none); timestamps = positions (the release has no times).
    Task-2/3 records get `user` = the test user whose sequence they prefix (the release lines up by index:
    train record k = the first items of test user k), so SFT prompts show that user's reviews and ratings and
    the same history block as the user's eval prompt; joined / unjoined / review-mismatch counts in stats.json.
    candidates_test.jsonl = the authors' 30 candidates in their order; candidates_valid.jsonl is sampled by us
    (the release has none) exactly like build.py does (n_negatives, negative_sampling, seed, eligible items only).
    The authors' test lists are NOT uniform samples: 95 of 100 are the target + 29 items of one fixed 30-item
    pool, 23 users have own history items among the negatives, "pick the odd one out" gets HR@1 95/100
    (audit_candidates; stats.json "test_candidates_audit"). Use them to check the import, never for headline numbers.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from twice.data import WORD_RATINGS, DataConfig, item_kind, negative_mask, split_targets
from twice.data.audit import audit_candidates
from twice.data.build import DataError, _write_jsonl, candidate_set, commit_dir, log, write_meta

TASK_FILES = {"task1": "llm_train", "task2": "llm_train_case_2", "task3": "llm_train_case_1", "test": "llm_test"}
BLOCK_RE = re.compile(r"title:(?P<title>.*?)\n- item_id:(?P<id>[^\n]*)\n- description:(?P<desc>.*?)"
                      r"\n- details:(?P<details>.*?)(?:\n- review:(?P<review>.*?)\n- rating:(?P<rating>[^\n]*))?\s*$",
                      re.S)
OUT_RE = re.compile(r"^\s*(?:<think>(?P<think>.*?)</think>)?\s*<item_nm>(?P<nm>.*?)</item_nm>\s*"
                    r"<item_id>(?P<id>.*?)</item_id>\s*$", re.S)


def find(raw: Path, domain: str, stem: str) -> Path | None:
    for name in (f"amazon_{domain}_{stem}_sample.json", f"amazon_{domain}_{stem}.json"):
        if (raw / name).exists():
            return raw / name
    return None


def parse_details(text: str) -> dict[str, str]:
    text = text.strip()
    if not text:
        return {}
    try:
        d = json.loads("{" + text + "}")
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in d.items()}
    except ValueError:   # cut mid-value by the authors' cap: keep the complete pairs, then the cut one
        pairs = dict(re.findall(r'"([^"]*)": "([^"]*)"', text))
        tail = re.search(r'"([^"]*)": "([^"]*)$', text)
        if tail:
            pairs[tail.group(1)] = tail.group(2)
        return pairs


def parse_blocks(section: str) -> list[dict]:
    """`title:..\\n- item_id:..\\n- description:..\\n- details:..[\\n- review:..\\n- rating:..]` blocks."""
    out = []
    for chunk in re.split(r"\n\n(?=title:)", section.strip()):
        m = BLOCK_RE.match(chunk.strip())
        if m is None:
            raise ValueError(f"item block not in the expected layout: {chunk[:120]!r}")
        out.append({k: (v.strip() if v is not None else None) for k, v in m.groupdict().items()})
    return out


def split_input(text: str) -> tuple[str, str]:
    """-> (purchase history section, candidate list section) of a recommendation prompt."""
    h = text.find("[Purchase History]")
    c = text.find("[Candidate List]")
    e = text.find("***Instruction***")
    if h < 0 or c < 0 or e < 0:
        raise ValueError("no [Purchase History] / [Candidate List] / ***Instruction*** section")
    hist = text[h + len("[Purchase History]"):c].lstrip(" :")
    cands = text[c + len("[Candidate List]"):e].lstrip(" :")
    return hist, cands


def import_official(cfg: DataConfig, out_dir: str | Path | None = None) -> Path:
    raw = Path(cfg.raw_dir).expanduser()
    domain = cfg.domain or "Grocery_and_Gourmet_Food"
    vocab_path = raw / f"amazon_vocab_{domain}.json"
    if not vocab_path.exists():
        raise DataError(f"{vocab_path} not found (raw_dir must hold the authors' JSON files, domain={domain!r})")
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    n_items = max(int(k) for k in vocab)
    titles = {int(k): v for k, v in vocab.items()}
    by_title: dict[str, list[int]] = {}          # title -> vocab idxs (a few titles are shared by 2 items)
    for k, t in sorted(titles.items()):
        by_title.setdefault(t, []).append(k)
    info: dict[int, dict] = {}        # vocab idx -> {"id", "description", "details"} learned from prompts
    counts = {"records_skipped": 0, "id_conflicts": 0}

    def learn(idx: int | None, blk: dict) -> None:
        if idx is None or not 1 <= idx <= n_items:
            return
        if idx in info:
            counts["id_conflicts"] += info[idx]["id"] != blk["id"]
            return
        info[idx] = {"id": blk["id"], "description": blk["desc"], "details": parse_details(blk["details"])}

    records: dict[str, list] = {}
    for task, stem in TASK_FILES.items():
        path = find(raw, domain, stem)
        records[task] = [] if path is None else json.loads(path.read_text(encoding="utf-8"))
        if path is None:
            log(f"{raw}: no amazon_{domain}_{stem}[_sample].json, {task} skipped")
        records[task] = [(path, k, r) for k, r in enumerate(records[task])]

    # phase 1: parse every record and learn ASINs from what is certain (history blocks aligned with output_id,
    # targets by positive_item_id, task-1 outputs by a unique title)
    parsed: dict[str, list] = {t: [] for t in TASK_FILES}
    for task in ("task2", "task3", "test", "task1"):
        for path, k, r in records[task]:
            where = f"{path}[{k}]"
            try:
                ex = (convert_item_knowledge(r, by_title, info) if task == "task1" else parse_rec(r, task, learn))
            except (ValueError, KeyError) as e:
                counts["records_skipped"] += 1
                log(f"{where}: skipped: {e}")
                continue
            parsed[task].append((where, k, ex))
    # phase 2: candidates by ASIN when known, else by title (a shared title goes to the one item still without ASIN)
    asin_idx = {v["id"]: idx for idx, v in info.items()}
    examples: dict[str, list] = {t: [] for t in TASK_FILES}
    users: list[dict] = []
    cand_test: list[dict] = []
    train_blocks: dict[int, tuple[int, list[dict]]] = {}     # id(task-2/3 example) -> (record index, history blocks)
    for task in ("task1", "task2", "task3", "test"):
        for where, k, ex in parsed[task]:
            if task != "task1":
                try:
                    ex["candidates"] = resolve_candidates(ex.pop("_cand_blocks"), ex, asin_idx, by_title, info)
                except ValueError as e:
                    counts["records_skipped"] += 1
                    log(f"{where}: skipped: {e}")
                    continue
                for idx, b in zip(ex["candidates"], ex.pop("_cand_blocks_seen")):
                    learn(idx, b)
                    asin_idx.setdefault(b["id"], idx)
            hist_blocks = ex.pop("_hist_blocks", None)
            examples[task].append(ex)
            if task in ("task2", "task3"):
                train_blocks[id(ex)] = (k, hist_blocks)
            if task == "test":
                uid = len(users) + 1
                ex["user"] = uid
                users.append({"idx": uid, "id": f"official-test-{k}", "items": ex["history"] + [ex["target"]],
                              "ratings": [WORD_RATINGS.get(b["rating"] or "") for b in hist_blocks] + [None],
                              "reviews": [b["review"] or "" for b in hist_blocks] + [""],
                              "timestamps": list(range(len(ex["history"]) + 1))})
                cand_test.append({"user": uid, "target": ex["target"], "candidates": ex["candidates"]})

    join_users(examples, users, train_blocks, counts)

    items = []
    for idx in range(1, n_items + 1):
        got = info.get(idx)
        items.append({"idx": idx, "id": got["id"] if got else str(idx), "title": titles.get(idx, str(idx)),
                      "description": got["description"] if got else "", "details": got["details"] if got else {}})
    counts["items_without_asin"] = sum(1 for idx in range(1, n_items + 1) if idx not in info)

    out = Path(out_dir or cfg.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-official")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_jsonl(tmp / "items.jsonl", items)
        _write_jsonl(tmp / "users.jsonl", users)
        _write_jsonl(tmp / "candidates_test.jsonl", cand_test)
        counts_train = np.zeros(n_items + 1, dtype=np.int64)
        for u in users:
            counts_train[u["items"][:-2]] += 1
        # negatives only from items that look like the targets (data.negative_mask): here the ones with an ASIN
        # and metadata, not the vocab's bare-number, text-less items
        mask = negative_mask([None] + [item_kind(it["id"], it["description"], it["details"]) for it in items],
                             split_targets(u["items"] for u in users))
        pool = np.flatnonzero(mask)
        counts["negative_pool"] = len(pool)
        cum = None if cfg.negative_sampling == "uniform" else np.cumsum(counts_train[pool] + 1)
        _write_jsonl(tmp / "candidates_valid.jsonl",
                     (candidate_set(cfg.seed, u["idx"], "valid", u["items"], pool, cfg.n_negatives, cum)
                      for u in users if len(u["items"]) >= 2))
        for task, exs in examples.items():
            _write_jsonl(tmp / f"examples_{task}.jsonl", exs)
        lengths = np.array([len(u["items"]) for u in users] or [0])
        n_inter = int(lengths.sum())
        stats = {"users": len(users), "items": n_items, "interactions": n_inter,
                 "sparsity": 1.0 - n_inter / max(1, len(users) * n_items),
                 "seq_len": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean()),
                             "median": float(np.median(lengths))},
                 "examples": {t: len(e) for t, e in examples.items()}, "filtered": counts,
                 # the released test lists are not uniform samples (audit_candidates): a caveat for every number
                 "test_candidates_audit": {k: v for k, v in audit_candidates(
                     [(c["target"], c["candidates"], u["items"][:-1]) for c, u in zip(cand_test, users)]).items()
                     if k != "pool"}}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        mapping = __doc__.split("What is mapped:")[1]
        write_meta(tmp, cfg, extra={"official": {"vocab": str(vocab_path), "mapping": mapping}})
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    audit = stats["test_candidates_audit"]
    if audit and audit["odd_one_out_hr1"] > 2 * audit["chance_hr1"]:
        log(f"WARNING: the released test candidate lists are not uniform: picking the candidate outside the "
            f"{audit['candidates']} most frequent negatives gets HR@1 {audit['odd_one_out_hr1']:.2f} (chance "
            f"{audit['chance_hr1']:.3f}); do not report headline numbers on candidates_test.jsonl of this dir")
    log(f"official import: {n_items} items, {len(users)} test users, "
        + ", ".join(f"{len(e)} {t}" for t, e in examples.items()))
    return out


def join_users(examples: dict, users: list[dict], train_blocks: dict, counts: dict) -> None:
    """Give each task-2/3 record the test user it belongs to (`ex["user"]`), so SFT renders that user's reviews and
    ratings (train_sft.record_user) and its prompt shows the same history block as the eval prompt of the user.
    The release lines up by index (train record k = the first items of test user k); the user of the same index
    is taken when the record's history + target is a prefix of its sequence, else the one user whose sequence it
    prefixes (ambiguous or none: left unjoined and counted). Reviews/ratings that disagree with the record's own
    history blocks are counted (the test record's are used)."""
    by_index = {u["id"]: u for u in users}
    for task in ("task2", "task3"):
        joined = unjoined = text_mismatch = touched = 0
        for ex in examples[task]:
            k, blocks = train_blocks[id(ex)]
            seq = ex["history"] + [ex["target"]]

            def fits(u):
                return u["items"][:len(seq)] == seq and len(u["items"]) > len(seq)
            u = by_index.get(f"official-test-{k}")
            if u is None or not fits(u):
                found = [v for v in users if fits(v)]
                u = found[0] if len(found) == 1 else None
            if u is None:
                unjoined += 1
                continue
            ex["user"] = u["idx"]
            joined += 1
            touched += len((set(ex["candidates"]) - {ex["target"]}) & set(u["items"]))   # the authors' negatives
            text_mismatch += any((b["review"] or "") != u["reviews"][p] or WORD_RATINGS.get(b["rating"] or "") !=
                                 u["ratings"][p] for p, b in enumerate(blocks))
        counts[f"{task}_joined_users"] = joined
        counts[f"{task}_unjoined"] = unjoined
        counts[f"{task}_review_mismatch"] = text_mismatch
        counts[f"{task}_touched_negatives"] = touched    # their list's negatives the user touched (sample: 5)
        if unjoined:
            log(f"{task}: {unjoined} of {joined + unjoined} records match no test user: trained without reviews")


def parse_rec(r: dict, task: str, learn) -> dict:
    hist_ids = [int(x) for x in str(r["output_id"]).split(",") if x.strip()]
    target = int(r["positive_item_id"])
    hist_txt, cand_txt = split_input(r["input"])
    hist_blocks, cand_blocks = parse_blocks(hist_txt), parse_blocks(cand_txt)
    if len(hist_blocks) != len(hist_ids):
        raise ValueError(f"{len(hist_blocks)} history blocks but output_id has {len(hist_ids)} ids")
    for idx, b in zip(hist_ids, hist_blocks):
        learn(idx, b)
    m = OUT_RE.match(r["output"])
    if m is None:
        raise ValueError("output is not `[<think>..</think>] <item_nm>..</item_nm> <item_id>..</item_id>`")
    target_asin = m.group("id").strip()
    tblock = next((b for b in cand_blocks if b["id"] == target_asin), None)
    if tblock is None:
        raise ValueError(f"target {target_asin} is not in the candidate list")
    learn(target, tblock)
    rationale = (m.group("think") or "").strip()
    output = (f"<think>{rationale}</think>" if m.group("think") is not None else "") + f"<item>{target_asin}</item>"
    ex = {"task": task, "system": r.get("system_prompt", ""), "input": r["input"], "output": output,
          "output_raw": r["output"], "history": hist_ids, "target": target, "target_id": target_asin,
          "candidates": None, "_hist_blocks": hist_blocks, "_cand_blocks": cand_blocks}
    if m.group("think") is not None:
        ex["rationale"] = rationale
    return ex


def resolve_candidates(blocks: list[dict], ex: dict, asin_idx: dict, by_title: dict, info: dict) -> list[int]:
    out = []
    for b in blocks:
        idx = asin_idx.get(b["id"])
        if idx is None:
            free = [k for k in by_title.get(b["title"], []) if k not in info and k not in out]
            if not free:
                raise ValueError(f"candidate {b['id']} ({b['title'][:40]!r}) not found in the vocab by title")
            idx = free[0]
        out.append(idx)
    if len(set(out)) != len(out):
        raise ValueError("two candidates map to the same vocab item")
    ex["_cand_blocks_seen"] = blocks
    return out


def convert_item_knowledge(r: dict, by_title: dict, info: dict) -> dict:
    first = r["input"].split("\n", 1)[0]
    if not first.startswith("[Item Title]"):
        raise ValueError("task-1 input does not start with [Item Title]")
    title = first[len("[Item Title]"):].lstrip(" :").strip()
    idxs = by_title.get(title, [])
    idx = idxs[0] if len(idxs) == 1 else None
    m = re.search(r"<item_info>\s*item_id:(\S+)\n- description:(.*?)\n- details:(.*?)</item_info>", r["output"], re.S)
    if m and idx is not None and idx not in info:
        info[idx] = {"id": m.group(1).strip(), "description": m.group(2).strip(),
                     "details": parse_details(m.group(3).strip())}
    return {"task": "task1", "system": r.get("system_prompt", ""), "input": r["input"], "output": r["output"],
            "output_raw": r["output"], "item": idx, "title": title, "target_id": m.group(1).strip() if m else None}

