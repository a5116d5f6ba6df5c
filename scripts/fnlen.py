#!/usr/bin/env python3
# Functions longer than 80 lines (test modules skipped).
#   scripts/fnlen.py coordinator/src agent/src
import re,sys,os
res=[]
for root in sys.argv[1:]:
    for dp,_,fs in os.walk(root):
        for f in fs:
            if not f.endswith('.rs'): continue
            p=os.path.join(dp,f); lines=open(p).read().split('\n')
            # skip test modules
            end_code=len(lines)
            for i,l in enumerate(lines):
                if l.startswith('#[cfg(test)]'): end_code=i; break
            i=0
            while i<end_code:
                l=lines[i]
                m=re.match(r'\s*(pub(\([^)]*\))?\s+)?(async\s+)?(unsafe\s+)?(extern "C"\s+)?fn\s+(\w+)',l)
                if m:
                    depth=0; started=False; j=i
                    while j<end_code:
                        for ch in lines[j]:
                            if ch=='{': depth+=1; started=True
                            elif ch=='}': depth-=1
                        if started and depth==0: break
                        if not started and lines[j].rstrip().endswith(';'): break
                        j+=1
                    n=j-i+1
                    if n>80: res.append((n,p,m.group(6),i+1))
                i+=1
for r in sorted(res,reverse=True): print(*r)
