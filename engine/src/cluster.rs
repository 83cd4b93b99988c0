//! Duplicate groups: union-find over hit pairs.

/// Groups rows `0..n` connected by `pairs` into clusters; returns the clusters of two or more rows, each
/// sorted, ordered by their smallest row (deterministic whatever the order of `pairs`).
pub fn union_find(n: usize, pairs: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for &(a, b) in pairs {
        if a >= n || b >= n {
            continue;
        }
        let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
        if ra != rb {
            // Keep the smaller root so roots are each cluster's smallest row.
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            parent[hi] = lo;
        }
    }
    let mut groups: std::collections::BTreeMap<usize, Vec<usize>> =
        std::collections::BTreeMap::new();
    let touched: std::collections::BTreeSet<usize> = pairs
        .iter()
        .flat_map(|&(a, b)| [a, b])
        .filter(|&x| x < n)
        .collect();
    for x in touched {
        let r = find(&mut parent, x);
        groups.entry(r).or_default().push(x);
    }
    groups.into_values().filter(|g| g.len() >= 2).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_merge_and_order_is_deterministic() {
        let a = union_find(10, &[(7, 3), (3, 9), (1, 2), (5, 5)]);
        assert_eq!(a, vec![vec![1, 2], vec![3, 7, 9]]);
        let b = union_find(10, &[(1, 2), (9, 3), (3, 7)]);
        assert_eq!(a, b);
        assert!(union_find(3, &[]).is_empty());
    }
}
