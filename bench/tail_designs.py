"""Pool self-join vs row-vs-all sampling of the face impostor tail: spread of the sampled survival around
the whole store's, at survival levels 1e-5..1e-8. Usage: designs.py POPDIR TRIALS"""
import numpy as np, csv, sys, time
d=sys.argv[1]; T=int(sys.argv[2])
X=np.load(f'{d}/face.npy').astype(np.float32); N=len(X)
ids=[r['subject_id'] for r in csv.DictReader(open(f'{d}/subjects.csv'))]
row={s:i for i,s in enumerate(ids)}
truth=set()
for r in csv.reader(open(f'{d}/truth.csv')):
    if r[0] in row and r[1] in row:
        a,b=row[r[0]],row[r[1]]; truth.add((min(a,b),max(a,b)))
def pairs_above(A, arows, B, brows, t, upper):
    out=[]
    for i in range(0,len(A),2000):
        S=A[i:i+2000]@B.T
        ii,jj=np.nonzero(S>=t)
        for a,b in zip(ii,jj):
            ra,rb=arows[i+a],brows[b]
            if ra==rb: continue
            if upper and ra>rb: continue
            k=(min(ra,rb),max(ra,rb))
            if k in truth: continue
            out.append((k,S[a,b]))
    return out
t0=time.time()
allrows=np.arange(N)
# whole store, cut at a cosine low enough for 1e-5 (found from a quick sample)
samp=np.random.default_rng(0).choice(N,3000,replace=False)
S=X[samp]@X.T; S[np.arange(3000),samp]=-2
cut=float(np.quantile(S.ravel(),1-2e-5))
full=pairs_above(X,allrows,X,allrows,cut,True)
sc=np.sort(np.array([s for _,s in dict(full).items()]))[::-1]
P=N*(N-1)//2
levels=[1e-5,1e-6,1e-7,1e-8]
ths=[float(sc[int(l*P)-1]) for l in levels]
print('full',len(sc),'cut',cut,'ths',ths,'%.0fs'%(time.time()-t0),flush=True)
rng=np.random.default_rng(7)
Pp=40000; p=Pp*Pp//(2*N)
for trial in range(T):
    pool=np.sort(rng.choice(N,Pp,replace=False))
    a=dict(pairs_above(X[pool],pool,X[pool],pool,min(ths),True))
    na=Pp*(Pp-1)//2
    ra=[sum(1 for s in a.values() if s>=t)/na/l for t,l in zip(ths,levels)]
    rows=np.sort(rng.choice(N,p,replace=False))
    b=dict(pairs_above(X[rows],rows,X,allrows,min(ths),False))
    nb=p*(N-1)-p*(p-1)//2
    rb=[sum(1 for s in b.values() if s>=t)/nb/l for t,l in zip(ths,levels)]
    print(trial,'pool',' '.join('%.2f'%x for x in ra),'| rows',' '.join('%.2f'%x for x in rb),flush=True)
