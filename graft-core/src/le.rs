//! Little-endian fields of byte records: the broker protocol's records and
//! the ELF headers the launcher reads. The caller has checked that the
//! record holds the field; reading past its end panics.

pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

#[cfg(test)]
mod tests {
    #[test]
    fn fields() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(super::u16_at(&b, 1), 0x0302);
        assert_eq!(super::u32_at(&b, 0), 0x0403_0201);
        assert_eq!(super::u64_at(&b, 1), 0x0908_0706_0504_0302);
    }
}
