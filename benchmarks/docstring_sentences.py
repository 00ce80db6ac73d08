"""English sentences for benchmarks/scale.py's real-encoder run: the docstrings of ~90 standard-library modules,
split into sentences of 6-40 words (mostly letters), deduplicated, shuffled (seed 0), the first 1500 by default.

Usage: ``python benchmarks/docstring_sentences.py [COUNT]`` writes the first COUNT (default 1500; ``all``: every
one, about 3000) to ``sentences.txt`` in the current directory.
Nothing is downloaded; the text is whatever this Python's standard library documents.
"""

import importlib
import inspect
import random
import re
import sys

mods = ["os","re","json","collections","itertools","functools","pathlib","argparse","logging","subprocess","threading",
        "asyncio","email","http.client","urllib.request","xml.dom.minidom","csv","sqlite3","datetime","calendar",
        "random","statistics","decimal","fractions","string","textwrap","difflib","unittest","doctest","pickle",
        "shutil","tempfile","zipfile","tarfile","socket","ssl","select","selectors","queue","heapq","bisect",
        "typing","dataclasses","enum","contextlib","abc","inspect","ast","dis","tokenize","pdb","profile","timeit",
        "gettext","locale","codecs","unicodedata","hashlib","hmac","secrets","base64","binascii","struct","array",
        "weakref","copy","pprint","reprlib","traceback","warnings","multiprocessing","concurrent.futures","sched",
        "mailbox","mimetypes","html.parser","wave","colorsys","imaplib","smtplib","ftplib","poplib","uuid","ipaddress"]
texts = []
for name in mods:
    try:
        m = importlib.import_module(name)
    except Exception:
        continue
    objs = [m] + [v for _, v in inspect.getmembers(m) if inspect.isfunction(v) or inspect.isclass(v)]
    for o in objs:
        d = inspect.getdoc(o)
        if d:
            texts.append(d)
sentences = set()
for t in texts:
    t = re.sub(r"\s+", " ", t)
    for s in re.split(r"(?<=[.!?])\s+", t):
        w = s.split()
        if 6 <= len(w) <= 40 and sum(c.isalpha() for c in s) > 0.7 * len(s) and not re.search(r"[>{}=\[\]]", s):
            sentences.add(s.strip())
s = sorted(sentences)
random.Random(0).shuffle(s)
count = sys.argv[1] if len(sys.argv) > 1 else "1500"
open("sentences.txt", "w").write("\n".join(s if count == "all" else s[:int(count)]) + "\n")
print(len(sentences))
