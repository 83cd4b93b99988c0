"""Identify probes for the 1 M benchmarks (BENCHMARKS.md "Joint scan of identify batches"): N seeded rows of a
population written by `pacha generate -o gen -n ROWS` (face 512, fingers 2 and 7, 256), each present template
moved to cosine ~0.8 with fresh noise. Pure Python (no numpy), seed 7.

Run in the directory holding `gen/`: `python3 identify_probes.py [N [ROWS]]`; writes p_face.npy, p_finger2.npy,
p_finger7.npy, p_subjects.csv (qualities of the source rows) and p_subjects_face.csv (fingers marked absent).
"""
import random, struct, math, sys
N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
ROWS = int(sys.argv[2]) if len(sys.argv) > 2 else 1000000
rng = random.Random(7)
rows = sorted(rng.sample(range(ROWS), N))
def read(name, dim):
    f = open(f'gen/{name}.npy', 'rb')
    hl = struct.unpack('<H', f.read(10)[8:10])[0]
    off = 10 + hl
    out = []
    for r in rows:
        f.seek(off + r * dim * 4)
        out.append(list(struct.unpack(f'<{dim}f', f.read(dim * 4))))
    return out
def write(name, vecs, dim):
    hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (len(vecs), dim)
    hdr = hdr + ' ' * (127 - 10 - len(hdr)) + '\n'
    with open(f'p_{name}.npy', 'wb') as f:
        f.write(b'\x93NUMPY\x01\x00' + struct.pack('<H', len(hdr)) + hdr.encode())
        for v in vecs:
            f.write(struct.pack(f'<{dim}f', *v))
def move(v):
    n = math.sqrt(sum(x * x for x in v))
    if n == 0:
        return v
    d = len(v)
    g = [rng.gauss(0, 1 / math.sqrt(d)) for _ in range(d)]
    w = [x / n + 0.75 * y for x, y in zip(v, g)]
    m = math.sqrt(sum(x * x for x in w))
    return [x / m for x in w]
for name, dim in [('face', 512), ('finger2', 256), ('finger7', 256)]:
    write(name, [move(v) for v in read(name, dim)], dim)
lines = open('gen/subjects.csv').read().split('\n')
with open('p_subjects.csv', 'w') as f:
    f.write(lines[0] + '\n')
    for i, r in enumerate(rows):
        parts = lines[1 + r].split(',')
        parts[0] = 'Q%06d' % i
        f.write(','.join(parts) + '\n')
# Face-only: the same probes, fingers marked absent.
with open('p_subjects_face.csv', 'w') as f:
    f.write(lines[0] + '\n')
    for i, r in enumerate(rows):
        parts = lines[1 + r].split(',')
        parts[0] = 'Q%06d' % i
        parts[3:7] = ['0', '0', '0', '0']
        f.write(','.join(parts) + '\n')
print('rows', rows[:5])
