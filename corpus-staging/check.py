"""Checks one staging part: python check.py part-N.jsonl writers-N.jsonl (prints problems, exit 1 if any)."""
import collections, glob, json, sys
EMOTIONS = ["joy", "sadness", "anticipation", "surprise", "anger", "fear", "disgust", "trust"]
REGISTERS = {"diary", "sns", "chat", "review", "news_comment", "formal", "letter", "dialogue"}
part, writers_file = sys.argv[1], sys.argv[2]
problems = []
def grams(t, n=5):
    t = "".join(t.split())
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}
personas = {}
for i, line in enumerate(open(writers_file, encoding="utf-8"), 1):
    p = json.loads(line)
    if set(p) != {"writer", "persona"} or not p["persona"].strip():
        problems.append(f"{writers_file}:{i}: needs exactly writer and persona")
    personas[p["writer"]] = p["persona"]
rows = []
for i, line in enumerate(open(part, encoding="utf-8"), 1):
    try:
        r = json.loads(line)
    except json.JSONDecodeError as e:
        problems.append(f"{part}:{i}: not JSON: {e}"); continue
    if set(r) != {"text", "writer", "register", "intensity"}:
        problems.append(f"{part}:{i}: fields must be text, writer, register, intensity; got {sorted(r)}"); continue
    if r["writer"] not in personas:
        problems.append(f"{part}:{i}: writer {r['writer']} has no persona")
    if r["register"] not in REGISTERS:
        problems.append(f"{part}:{i}: register {r['register']!r} not in {sorted(REGISTERS)}")
    it = r["intensity"]
    if list(it) != EMOTIONS or any(not isinstance(v, int) or not 0 <= v <= 3 for v in it.values()):
        problems.append(f"{part}:{i}: intensity must have the 8 emotions in order, ints 0-3")
    elif max(it.values()) < 1:
        problems.append(f"{part}:{i}: no emotion at all")
    if not 4 <= len(r["text"]) <= 160:
        problems.append(f"{part}:{i}: text length {len(r['text'])} outside 4-160")
    rows.append((i, r))
existing = [json.loads(l)["text"] for f in sorted(glob.glob("/work/main/platform/mlplatform/emotion/corpus/*.jsonl")) for l in open(f, encoding="utf-8")]
others = [json.loads(l)["text"] for f in sorted(glob.glob("/work/main/corpus-staging/part-*.jsonl")) if f.split("/")[-1] != part.split("/")[-1] for l in open(f, encoding="utf-8") if l.strip()]
pool = [(t, grams(t), "existing corpus or another part") for t in existing + others]
index = collections.defaultdict(list)
for k, (t, h, where) in enumerate(pool):
    for x in h:
        index[x].append(k)
for i, r in rows:
    g = grams(r["text"])
    shared = collections.Counter(k for x in g for k in index.get(x, ()))
    for k, n in shared.most_common(5):
        t, h, where = pool[k]
        j = n / max(1, len(g | h))
        if j >= 0.5:
            problems.append(f"{part}:{i}: near-duplicate (5-gram Jaccard {j:.2f}) of {where}: {t[:40]}"); break
    k = len(pool)
    pool.append((r["text"], g, f"line of {part} itself"))
    for x in g:
        index[x].append(k)
count = collections.Counter(r["writer"] for _, r in rows)
dominant = collections.defaultdict(collections.Counter)
for _, r in rows:
    top = max(r["intensity"].values())
    if top >= 2:
        for e, v in r["intensity"].items():
            if v == top:
                dominant[r["writer"]][e] += 1
for w in personas:
    if count[w] < 34:
        problems.append(f"writer {w}: {count[w]} sentences, needs 34")
    short = [e for e in EMOTIONS if dominant[w][e] < 4]
    if short:
        problems.append(f"writer {w}: fewer than 4 sentences where these are the strongest (>=2): {short}")
regs = collections.Counter(r["register"] for _, r in rows)
print(f"{len(rows)} sentences, {len(personas)} writers, registers {dict(regs)}")
print("\n".join(problems) or "no problems")
sys.exit(1 if problems else 0)
