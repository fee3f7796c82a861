#!/usr/bin/env python3
"""Summarises the runs bench/run.sh recorded (one JSON object a line) into
the table it prints and the JSON result file.

usage: report.py RUNS.jsonl OUT.json META.json

A run line: {"scenario": "P1", "tool": "vmreplica", "run": 1,
             "seconds": 1.23, "wire_bytes": 456, ...extra numbers}.
A note line: {"scenario": "P3", "note": "..."} (shown as is).
"""
import json
import statistics
import sys

# For each scenario: how its goal is checked. "speed": their median time /
# our median time against `goal` (ours must be at least that many times
# faster). Other kinds compare one number of ours with a bound.
GOALS = {
    "P1": {"kind": "speed", "vs": {"qemu-img convert": 0.9, "nbdcopy": None, "rsync --sparse": 3.0}},
    "P2": {"kind": "speed", "vs": {"rsync --inplace --no-whole-file": 50.0}},
    "P3": {"kind": "speed", "vs": {"rsync --inplace --no-whole-file": 2.0}},
    "P4": {"kind": "bound", "metric": "written_per_changed", "max": 2.0, "tools": ["vmreplica, history on"]},
    "P5": {"kind": "ratio", "metric": "mib_per_s", "ours": "writes, replicating (cycles back to back)",
           "theirs": "writes, no replication", "min": 0.95},
}


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def fmt_bytes(b):
    if b is None:
        return "-"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{int(b)} B"


def main():
    runs_path, out_path, meta_path = sys.argv[1:4]
    rows, notes = [], []
    with open(runs_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            (notes if "note" in d else rows).append(d)
    with open(meta_path) as f:
        meta = json.load(f)

    # scenario -> tool -> list of runs, in first-seen order
    groups = {}
    for r in rows:
        groups.setdefault(r["scenario"], {}).setdefault(r["tool"], []).append(r)

    summary = []
    for scen, tools in groups.items():
        for tool, rs in tools.items():
            s = {"scenario": scen, "tool": tool, "seconds": spread([r.get("seconds") for r in rs])}
            keys = sorted({k for r in rs for k in r if k not in ("scenario", "tool", "run", "seconds")})
            for k in keys:
                vals = [r.get(k) for r in rs if isinstance(r.get(k), (int, float))]
                if vals:
                    s[k] = spread(vals)
            summary.append(s)

    def med(scen, tool, key="seconds"):
        for s in summary:
            if s["scenario"] == scen and s["tool"] == tool and s.get(key):
                return s[key]["median"]
        return None

    verdicts = []
    for scen, g in GOALS.items():
        if scen not in groups:
            continue
        if g["kind"] == "speed":
            ours = med(scen, "vmreplica")
            for tool, goal in g["vs"].items():
                theirs = med(scen, tool)
                if ours is None or theirs is None:
                    continue
                ratio = theirs / ours
                verdicts.append({"scenario": scen, "against": tool, "what": "speed (their time / our time)",
                                 "value": ratio, "goal": (f">= {goal}x" if goal else "none"),
                                 "met": (ratio >= goal) if goal else None})
            if scen == "P2":
                wire, z = med(scen, "vmreplica", "wire_bytes"), med(scen, "vmreplica", "zstd_changed_bytes")
                if wire and z:
                    verdicts.append({"scenario": scen, "against": "zstd -1 of the changed blocks",
                                     "what": "wire bytes ours / zstd size", "value": wire / z,
                                     "goal": "<= 1.05", "met": wire / z <= 1.05})
        elif g["kind"] == "bound":
            for tool in g["tools"]:
                v = med(scen, tool, g["metric"])
                if v is not None:
                    verdicts.append({"scenario": scen, "against": "-", "what": f"{g['metric']} ({tool})",
                                     "value": v, "goal": f"<= {g['max']}", "met": v <= g["max"]})
        elif g["kind"] == "ratio":
            ours, theirs = med(scen, g["ours"], g["metric"]), med(scen, g["theirs"], g["metric"])
            if ours and theirs:
                verdicts.append({"scenario": scen, "against": g["theirs"], "what": f"{g['metric']} ours / theirs",
                                 "value": ours / theirs, "goal": f">= {g['min']}", "met": ours / theirs >= g["min"]})

    out = {"meta": meta, "summary": summary, "goals": verdicts, "notes": notes, "runs": rows}
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)

    # The table.
    print()
    print(f"# {meta.get('when', '')}  size {fmt_bytes(meta.get('size'))}  runs {meta.get('runs')}  "
          f"build {meta.get('build_type', '?')}  load before {meta.get('loadavg_before', '?')}  "
          f"after {' '.join(meta.get('loadavg_after', ['?']))}  "
          f"replica {'applies while receiving' if meta.get('apply_while_receiving', True) else 'stages deltas first'}"
          + (f"  P3 seed {meta['p3_seed']}" if 'p3_seed' in meta else ""))
    print("| scenario | tool | min s | median s | max s | wire (median) | other (median) |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        sec = s["seconds"]
        secs = [f"{sec[k]:.3f}" for k in ("min", "median", "max")] if sec else ["-", "-", "-"]
        wire = fmt_bytes(s["wire_bytes"]["median"]) if s.get("wire_bytes") else "-"
        other = []
        for k, v in s.items():
            if k in ("scenario", "tool", "seconds", "wire_bytes") or not isinstance(v, dict):
                continue
            m = v["median"]
            other.append(f"{k} {fmt_bytes(m) if k.endswith('bytes') else f'{m:.3f}'.rstrip('0').rstrip('.')}")
        print(f"| {s['scenario']} | {s['tool']} | {' | '.join(secs)} | {wire} | {', '.join(other)} |")
    for n in notes:
        print(f"| {n['scenario']} | - | - | - | - | - | {n['note']} |")
    print()
    print("| scenario | against | measure | value | goal | met |")
    print("|---|---|---|---|---|---|")
    for v in verdicts:
        met = "-" if v["met"] is None else ("yes" if v["met"] else "**NO**")
        print(f"| {v['scenario']} | {v['against']} | {v['what']} | {v['value']:.3f} | {v['goal']} | {met} |")
    print(f"\nresults: {out_path}")


if __name__ == "__main__":
    main()
