//! Reading `/proc/self/mountinfo`, which graftd (saved namespaces under
//! `/run/netns`) and graft-ebpf (the cgroup2 and bpffs mounts) both search.

/// Undoes mountinfo's `\NNN` octal escapes (a space in a mount point is
/// `\040`); a backslash not followed by three octal digits stays as it is.
pub fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_escapes_only() {
        assert_eq!(unescape("/run/netns/a\\040b"), "/run/netns/a b");
        assert_eq!(unescape("a\\\\134b"), "a\\\\b");
        assert_eq!(unescape("x\\04"), "x\\04");
        assert_eq!(unescape("x\\400y"), "x\\400y");
    }
}
