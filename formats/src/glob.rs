//! Shell-style `*` and `?` patterns on a whole name (no classes), as
//! `flash station --match` takes device names and systemd-boot's
//! `default` takes entry ids.

/// Whether `pat` matches the whole of `name`.
pub fn glob(pat: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pat.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_match_whole_names() {
        assert!(glob("loop*", "loop12"));
        assert!(glob("usb-*SD*", "usb-Generic_SD_Reader_0001-0:0"));
        assert!(glob("sd?", "sdb") && !glob("sd?", "sdb1"));
        assert!(!glob("loop*", "sda") && glob("*", ""));
        assert!(glob("a*b?c", "a--bxc") && !glob("a*b?c", "a--bc"));
    }
}
