//! Human sizes on the command line: `10GiB`, `512MiB`, `4096`, `1.5TiB`.

/// Parses a size with an optional binary (KiB/MiB/GiB/TiB, also K/M/G/T) or decimal
/// (KB/MB/GB/TB) suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {s:?}; use KiB, MiB, GiB or TiB (e.g. 10GiB)")),
    };
    let not_a_size = || format!("{s:?} is not a size; write e.g. 10GiB, 512MiB or 4096");
    if !num.contains('.') {
        // Whole numbers are exact (no float rounding of large byte counts).
        let n: u64 = num.parse().map_err(|_| not_a_size())?;
        return n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is out of range"));
    }
    let value: f64 = num.parse().map_err(|_| not_a_size())?;
    let bytes = value * mult as f64;
    if !(bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64) {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// Formats bytes with a binary unit, e.g. `10 GiB`, `1.5 MiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert!(parse_size("10 parsecs").is_err());
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64KB"), Ok(64_000), "KB is decimal, KiB binary");
        assert_eq!(parse_size("9007199254740993"), Ok(9_007_199_254_740_993), "exact, not rounded");
        assert!(parse_size("20000000TiB").unwrap_err().contains("out of range"));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("GiB").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(100), "100 B");
    }
}
