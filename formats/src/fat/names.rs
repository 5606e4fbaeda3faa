//! FAT directory names: 8.3 short names (with the lowercase flags Windows
//! and Linux use), VFAT long-name entries, and deterministic `~N` aliases.

use std::collections::HashSet;

/// NTRes flags: base / extension stored lowercase.
pub const LOWER_BASE: u8 = 0x08;
pub const LOWER_EXT: u8 = 0x10;

fn short_char(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || b"!#$%&'()-@^_`{}~".contains(&c)
}

/// `name` as an 8.3 entry without a long name, if it can be one: each part
/// all-uppercase or all-lowercase (flagged), valid characters only.
pub fn plain_short(name: &str) -> Option<([u8; 11], u8)> {
    let (base, ext) = match name.rfind('.') {
        Some(0) => return None,
        Some(i) => (&name[..i], &name[i + 1..]),
        None => (name, ""),
    };
    if base.is_empty() || base.len() > 8 || ext.len() > 3 || base.contains('.') {
        return None;
    }
    let mut flags = 0;
    let mut out = [b' '; 11];
    for (part, flag, off) in [(base, LOWER_BASE, 0), (ext, LOWER_EXT, 8)] {
        let lower = part.bytes().any(|c| c.is_ascii_lowercase());
        let upper = part.bytes().any(|c| c.is_ascii_uppercase());
        if lower && upper {
            return None;
        }
        if lower {
            flags |= flag;
        }
        for (i, c) in part.bytes().enumerate() {
            let c = c.to_ascii_uppercase();
            if !short_char(c) {
                return None;
            }
            out[off + i] = c;
        }
    }
    if out[0] == 0xE5 {
        return None;
    }
    Some((out, flags))
}

/// A unique `BASE~N.EXT` alias for a name that needs a long-name entry.
pub fn alias(name: &str, taken: &mut HashSet<[u8; 11]>) -> [u8; 11] {
    let clean = |s: &str| -> Vec<u8> {
        s.bytes()
            .map(|c| c.to_ascii_uppercase())
            .filter(|&c| short_char(c))
            .collect()
    };
    let (base, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (clean(&name[..i]), clean(&name[i + 1..])),
        _ => (clean(name), Vec::new()),
    };
    let base = if base.is_empty() {
        b"FILE".to_vec()
    } else {
        base
    };
    for n in 1u32.. {
        let tail = format!("~{n}");
        let keep = (8 - tail.len()).min(base.len());
        let mut out = [b' '; 11];
        out[..keep].copy_from_slice(&base[..keep]);
        out[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
        for (i, &c) in ext.iter().take(3).enumerate() {
            out[8 + i] = c;
        }
        if taken.insert(out) {
            return out;
        }
    }
    unreachable!("the alias space is unbounded")
}

pub fn checksum(short: &[u8; 11]) -> u8 {
    short.iter().fold(0u8, |s, &c| {
        ((s & 1) << 7).wrapping_add(s >> 1).wrapping_add(c)
    })
}

/// The long-name entries (in on-disk order) for `name`.
pub fn lfn_entries(name: &str, short: &[u8; 11]) -> Vec<[u8; 32]> {
    let mut units: Vec<u16> = name.encode_utf16().collect();
    if !units.len().is_multiple_of(13) {
        units.push(0);
        while !units.len().is_multiple_of(13) {
            units.push(0xFFFF);
        }
    }
    let n = units.len() / 13;
    let sum = checksum(short);
    let mut out = Vec::with_capacity(n);
    for k in (0..n).rev() {
        let mut e = [0u8; 32];
        e[0] = (k as u8 + 1) | if k == n - 1 { 0x40 } else { 0 };
        e[11] = 0x0F;
        e[13] = sum;
        let chunk = &units[k * 13..k * 13 + 13];
        let slots = (1..11)
            .step_by(2)
            .chain((14..26).step_by(2))
            .chain((28..32).step_by(2));
        for (u, off) in chunk.iter().zip(slots) {
            e[off..off + 2].copy_from_slice(&u.to_le_bytes());
        }
        out.push(e);
    }
    out
}

/// Names a long-name entry can hold: valid UTF-8, 1–255 UTF-16 units,
/// none of the characters FAT forbids.
pub fn valid_long(name: &str) -> bool {
    let n = name.encode_utf16().count();
    (1..=255).contains(&n)
        && !name
            .chars()
            .any(|c| (c as u32) < 0x20 || "\"*/:<>?\\|".contains(c))
        && name != "."
        && name != ".."
        && !name.ends_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_and_case_flags() {
        assert_eq!(plain_short("EFI").unwrap(), (*b"EFI        ", 0));
        assert_eq!(plain_short("BOOTX64.EFI").unwrap(), (*b"BOOTX64 EFI", 0));
        assert_eq!(plain_short("loader.conf"), None, "4-char extension");
        assert_eq!(
            plain_short("loader").unwrap(),
            (*b"LOADER     ", LOWER_BASE)
        );
        assert_eq!(plain_short("Mixed"), None);
        assert_eq!(plain_short("a b"), None);
    }

    #[test]
    fn aliases_are_unique_and_lfn_round_trips() {
        let mut taken = HashSet::new();
        let a = alias("nixos-generation-1.conf", &mut taken);
        let b = alias("nixos-generation-2.conf", &mut taken);
        assert_eq!(&a, b"NIXOS-~1CON");
        assert_eq!(&b, b"NIXOS-~2CON");
        let e = lfn_entries("nixos-generation-1.conf", &a);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0][0], 0x42);
        assert_eq!(e[1][0], 0x01);
        assert!(e.iter().all(|x| x[13] == checksum(&a)));
    }
}
