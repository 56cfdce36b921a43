//! Endpoint names.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest endpoint name in bytes (AF_GRAFT used `IFNAMSIZ - 1`).
pub const MAX_NAME_LEN: usize = 15;

/// Why a string is not a valid endpoint name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("endpoint name is empty")]
    Empty,
    #[error("endpoint name \"{0}\" is longer than {MAX_NAME_LEN} bytes")]
    TooLong(String),
    #[error("endpoint name \"{0}\" may only contain letters, digits, '-', '_' and '.'")]
    BadChar(String),
}

/// A validated endpoint name: 1..=15 bytes of `[A-Za-z0-9._-]`, stored inline
/// so the preload library can hold one without allocating.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointName {
    len: u8,
    bytes: [u8; MAX_NAME_LEN],
}

impl EndpointName {
    /// Validates `s` as an endpoint name.
    pub fn new(s: &str) -> Result<Self, NameError> {
        Self::from_bytes(s.as_bytes()).map_err(|e| match e {
            NameError::TooLong(_) => NameError::TooLong(s.to_owned()),
            NameError::BadChar(_) => NameError::BadChar(s.to_owned()),
            other => other,
        })
    }

    /// Validates raw bytes (e.g. from the wire) as an endpoint name.
    pub fn from_bytes(b: &[u8]) -> Result<Self, NameError> {
        if b.is_empty() {
            return Err(NameError::Empty);
        }
        if b.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(String::new()));
        }
        if !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        {
            return Err(NameError::BadChar(String::new()));
        }
        let mut bytes = [0u8; MAX_NAME_LEN];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Self {
            // The length check above bounds b.len() by 15.
            len: b.len() as u8,
            bytes,
        })
    }

    /// The name as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever accepted by `from_bytes`.
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

impl fmt::Display for EndpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for EndpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::str::FromStr for EndpointName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for EndpointName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EndpointName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        EndpointName::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_af_graft_names() {
        for n in ["ep-in4", "ep-out6", "a", "x.y_z-15chars12"] {
            assert_eq!(EndpointName::new(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(EndpointName::new(""), Err(NameError::Empty));
        assert_eq!(
            EndpointName::new("sixteen-bytes-xx")
                .unwrap_err()
                .to_string(),
            "endpoint name \"sixteen-bytes-xx\" is longer than 15 bytes"
        );
        assert!(matches!(
            EndpointName::new("a b"),
            Err(NameError::BadChar(_))
        ));
        assert!(matches!(
            EndpointName::new("a=b"),
            Err(NameError::BadChar(_))
        ));
        assert!(EndpointName::from_bytes(b"ab\0").is_err());
    }
}
