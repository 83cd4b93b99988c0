#!/usr/bin/env python3
"""Pool-to-pool spread of the face impostor tail (BENCHMARKS.md, "Calibration").

Counts, for TRIALS random pools of 20 000 rows of pop-structured/face.npy (run from the directory holding a
`pacha generate --preset structured` population named pop-structured), the share of all pairs at or above a
few cosines, and how many labelled (truth.csv) pairs fell among them. Needs numpy.
Usage: python3 tail_pools.py SEED TRIALS
"""
import numpy as np, csv, sys
X=np.load('pop-structured/face.npy').astype(np.float32)
ids=[r['subject_id'] for r in csv.DictReader(open('pop-structured/subjects.csv'))]
row={s:i for i,s in enumerate(ids)}
truth=set()
for r in csv.reader(open('pop-structured/truth.csv')):
    if r[0] in row and r[1] in row:
        a,b=row[r[0]],row[r[1]]; truth.add((min(a,b),max(a,b)))
ths=[0.3459,0.38,0.42,0.46]
rng=np.random.default_rng(int(sys.argv[1]))
P=20000
for trial in range(int(sys.argv[2])):
    pool=np.sort(rng.choice(len(X),P,replace=False))
    Y=X[pool]
    counts=np.zeros(len(ths),dtype=np.int64); tex=0
    for i in range(0,P,2000):
        S=Y[i:i+2000]@Y.T
        for k in range(S.shape[0]):
            S[k,:i+k+1]=-2
        for j,t in enumerate(ths): counts[j]+=(S>=t).sum()
        ii,jj=np.nonzero(S>=ths[0])
        for a,b in zip(ii,jj):
            ra,rb=pool[i+a],pool[b]
            if (min(ra,rb),max(ra,rb)) in truth: tex+=1
    pairs=P*(P-1)//2
    print(trial, [f"{c/pairs:.3e}" for c in counts], 'truth', tex, flush=True)
