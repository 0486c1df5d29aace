"""A tour of nlc's intermediate forms for one spec: python examples/tour.py specs/hope.yaml"""
import sys

import nlc
import nlc.spec
from nlc.loader import load_located
from nlc.rules import explain
from nlc.viz import to_dot

path = sys.argv[1] if len(sys.argv) > 1 else "specs/hope.yaml"
loaded = load_located(path)
spec = loaded.spec
print(f"== 1. Spec ({type(spec).__name__}), validated from {path}")
print(nlc.spec.dump(spec))
print("== 2. Level graph")
graph = nlc.lower(spec)
print(graph.dump(), "\n")
print("== 3. Derived update rules")
print(explain(spec))
print("== 4. The drawing (DOT; `nlc graph SPEC -o FILE.svg` renders it)")
print(to_dot(graph)[:800], "...")
