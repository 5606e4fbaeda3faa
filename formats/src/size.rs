//! Sizes as people write them on a command line.

/// `123`, `4K`, `512M`, `2G`, `1T` (powers of 1024).
pub fn parse(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|e| format!("{s:?} is not a size: {e}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn suffixes_are_powers_of_1024_and_garbage_is_named() {
        assert_eq!(super::parse("123"), Ok(123));
        assert_eq!(super::parse("4K"), Ok(4096));
        assert_eq!(super::parse("2g"), Ok(2 << 30));
        assert!(super::parse("x1M").unwrap_err().contains("\"x1M\""));
        assert!(super::parse("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }
}
