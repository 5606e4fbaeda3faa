//! Calendar dates of Unix times, for the formats that store them as dates
//! (FAT) and the text that shows them (boot entries).

/// (year, month 1–12, day 1–31, seconds into the day) of a Unix time, UTC.
/// Howard Hinnant's days-to-civil algorithm.
pub fn civil(unix: i64) -> (i64, u32, u32, u32) {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d, secs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_dates() {
        assert_eq!(super::civil(0), (1970, 1, 1, 0));
        assert_eq!(super::civil(951_782_400), (2000, 2, 29, 0));
        assert_eq!(super::civil(1_700_000_000), (2023, 11, 14, 80_000));
    }
}
