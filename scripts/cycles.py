#!/usr/bin/env python3
# Module import cycles of a Rust crate source dir (use crate::, super::
# edges; a parent module containing its children is not an edge).
#   scripts/cycles.py coordinator/src [-v]
import os,re,sys
root=sys.argv[1]
mods={}
for dp,_,fs in os.walk(root):
    for f in fs:
        if not f.endswith('.rs'): continue
        p=os.path.join(dp,f); rel=os.path.relpath(p,root)[:-3]
        parts=rel.split('/')
        if parts[-1] in('mod','lib','main'): parts=parts[:-1]
        mods['::'.join(parts)]=open(p).read()
def strip_tests(s):
    i=s.find('#[cfg(test)]\nmod tests')
    return s if i<0 else s[:i]
edges={m:set() for m in mods}
for m,s in mods.items():
    s=strip_tests(s)
    s=re.sub(r'//.*','',s)
    for r in re.findall(r'crate::([a-z_]+(?:::[a-z_]+)*)',s):
        segs=r.split('::')
        for k in range(len(segs),0,-1):
            c='::'.join(segs[:k])
            if c in mods and c!=m: edges[m].add(c); break
    parent=m.rsplit('::',1)[0] if '::' in m else ''
    for r in re.findall(r'super::([a-z_]+(?:::[a-z_]+)*)',s):
        segs=r.split('::')
        for k in range(len(segs),0,-1):
            c=(parent+'::' if parent else '')+'::'.join(segs[:k])
            if c in mods and c!=m: edges[m].add(c); break
    # use super::{a, b}
    for grp in re.findall(r'super::\{([^}]*)\}',s):
        for name in re.split(r'[,\s]+',grp):
            name=name.split('::')[0]
            c=(parent+'::' if parent else '')+name
            if c in mods and c!=m: edges[m].add(c)
# remove parent edges (child uses parent mod items is normal) and record cycles via SCC
idx={};low={};st=[];on=set();out=[];i=[0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v]=low[v]=i[0];i[0]+=1;st.append(v);on.add(v)
    for w in edges[v]:
        if w not in idx: sc(w); low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: out.append(comp)
for v in edges:
    if v not in idx: sc(v)
for c in out: print("cycle:",sorted(c))
if '-v' in sys.argv:
    for m in sorted(edges): print(m,'->',sorted(edges[m]))
