"""Does capture quality shift the impostor tail? Survival of impostor pairs among POOL rows, split by the
pair's lower face quality (bands), at the cosines where the whole pool's survival is 1e-4..1e-7; and the
genuine (truth) pairs' cosines per band. Usage: quality.py POPDIR POOL"""
import numpy as np, csv, sys
d=sys.argv[1]; Pp=int(sys.argv[2])
X=np.load(f'{d}/face.npy').astype(np.float32); N=len(X)
subj=list(csv.DictReader(open(f'{d}/subjects.csv')))
q=np.array([float(r['face_quality']) for r in subj],dtype=np.float32)
row={r['subject_id']:i for i,r in enumerate(subj)}
truth=set()
for r in csv.reader(open(f'{d}/truth.csv')):
    if r[0] in row and r[1] in row:
        a,b=row[r[0]],row[r[1]]; truth.add((min(a,b),max(a,b)))
edges=[0,0.35,0.6,0.8,1.01]
def band(x): return np.searchsorted(edges,x,side='right')-1
rng=np.random.default_rng(3)
pool=np.sort(rng.choice(N,Pp,replace=False)); Y=X[pool]; qp=q[pool]; bp=band(qp)
# pair counts per band (by the lower quality of the pair)
cnt=np.bincount(bp,minlength=4).astype(np.float64)
npairs=np.zeros(4)
for b in range(4):
    hi=cnt[b+1:].sum(); npairs[b]=cnt[b]*(cnt[b]-1)/2+cnt[b]*hi
ths=[0.30,0.35,0.40,0.45,0.50]
hits=np.zeros((4,len(ths)))
for i in range(0,Pp,2000):
    S=Y[i:i+2000]@Y.T
    for k in range(S.shape[0]): S[k,:i+k+1]=-2
    ii,jj=np.nonzero(S>=ths[0])
    for a,b in zip(ii,jj):
        ra,rb=pool[i+a],pool[b]
        if (min(ra,rb),max(ra,rb)) in truth: continue
        s=S[a,b]; bb=min(bp[i+a],bp[b])
        for t,th in enumerate(ths):
            if s>=th: hits[bb,t]+=1
tot=hits.sum(0)/npairs.sum()
print('cosines',ths); print('all   ',' '.join('%.2e'%x for x in tot))
for b in range(4):
    print('band %.2f-%.2f pairs %.2e'%(edges[b],edges[b+1],npairs[b]),' '.join('%.2e(%d)'%(hits[b,t]/npairs[b],hits[b,t]) for t in range(len(ths))), ' ratio', ' '.join('%.2f'%(hits[b,t]/npairs[b]/tot[t]) for t in range(len(ths))))
g=[[] for _ in range(4)]
for a,b in truth:
    s=float(X[a]@X[b]); g[band(min(q[a],q[b]))].append(s)
for b in range(4): print('genuine band',b,len(g[b]),'mean %.3f'%np.mean(g[b]) if g[b] else '')
