//! Byte ranges `(offset, length)`: what a writer maps, what an image holds.

/// Sorted, with touching or overlapping ranges joined; empty ones dropped.
pub fn merge(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.into_iter().filter(|r| r.1 > 0).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (o, l) in v {
        match out.last_mut() {
            Some(m) if o <= m.0 + m.1 => m.1 = m.1.max(o + l - m.0),
            _ => out.push((o, l)),
        }
    }
    out
}

/// `ranges` moved by `by` bytes.
pub fn shift(ranges: &[(u64, u64)], by: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    ranges.iter().map(move |&(o, l)| (o + by, l))
}

#[cfg(test)]
mod tests {
    #[test]
    fn merge_joins_touching_and_overlapping_ranges() {
        let m = super::merge([(10, 5), (0, 4), (4, 2), (12, 10), (30, 0), (40, 1)]);
        assert_eq!(m, vec![(0, 6), (10, 12), (40, 1)]);
    }
}
