"""Checks one unlabelled part: python check_unlabelled.py part-N.txt (prints problems, exit 1 if any)."""
import collections, glob, json, sys, unicodedata
from pathlib import Path
STAGING = Path(__file__).resolve().parent
part = Path(sys.argv[1]).resolve()
def grams(t, n=5):
    t = "".join(unicodedata.normalize("NFKC", t).split())
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}
problems, lines = [], []
for i, line in enumerate(part.read_text(encoding="utf-8").splitlines(), 1):
    text = line.strip()
    if not text:
        problems.append(f"{part.name}:{i}: empty line"); continue
    if line != text:
        problems.append(f"{part.name}:{i}: leading or trailing spaces")
    if not 4 <= len(text) <= 200:
        problems.append(f"{part.name}:{i}: length {len(text)} outside 4-200")
    if not any("\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" for c in text):
        problems.append(f"{part.name}:{i}: no Japanese")
    lines.append((i, text))
labelled = [json.loads(l)["text"] for f in sorted(glob.glob(str(STAGING / "merged/corpus/*.jsonl"))) for l in open(f, encoding="utf-8") if l.strip()]
others = [(f"{Path(f).name}:{k}", l.strip()) for f in sorted(glob.glob(str(STAGING / "unlabelled/part-*.txt"))) if Path(f) != part
          for k, l in enumerate(open(f, encoding="utf-8"), 1) if l.strip()]
pool = [(f"labelled corpus", t) for t in labelled] + others
index = collections.defaultdict(list)
pool_grams = []
for k, (where, t) in enumerate(pool):
    g = grams(t); pool_grams.append(g)
    for x in g: index[x].append(k)
own_index = collections.defaultdict(list)
own = []
for i, text in lines:
    g = grams(text)
    hits = collections.Counter(k for x in g for k in index.get(x, ()))
    for k, shared in hits.items():
        if shared / len(g | pool_grams[k]) >= 0.5:
            problems.append(f"{part.name}:{i}: near-duplicate of {pool[k][0]}: {pool[k][1]!r}"); break
    mine = collections.Counter(j for x in g for j in own_index.get(x, ()))
    for j, shared in mine.items():
        if shared / len(g | own[j][1]) >= 0.5:
            problems.append(f"{part.name}:{i}: near-duplicate of your line {own[j][0]}"); break
    for x in g: own_index[x].append(len(own))
    own.append((i, g))
print(f"{len(lines)} lines, {sum(len(t) for _, t in lines)} characters")
print("\n".join(problems[:200]) if problems else "no problems")
sys.exit(1 if problems else 0)
