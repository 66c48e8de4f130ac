//! The protobuf wire format, as far as kiln's hand-encoded messages need it (TensorBoard's
//! `Event`, ONNX's `ModelProto`): fields are (number << 3 | wire type) varints followed by a
//! varint (type 0), 8 bytes (1), a length-prefixed run (2) or 4 bytes (5), little-endian.

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

pub(crate) fn put_f64(out: &mut Vec<u8>, field: u64, v: f64) {
    put_varint(out, (field << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_f32(out: &mut Vec<u8>, field: u64, v: f32) {
    put_varint(out, (field << 3) | 5);
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, field: u64, v: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

/// `v` as a varint field (negative values as their two's complement, as protobuf's int64).
pub(crate) fn put_int(out: &mut Vec<u8>, field: u64, v: i64) {
    put_varint_field(out, field, v as u64);
}

/// Protocol-buffer fields of one message: (field number, wire value).
pub(crate) enum Wire<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

pub(crate) fn fields(mut b: &[u8]) -> Option<Vec<(u64, Wire<'_>)>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(&mut b)?),
            1 => {
                let (v, rest) = b.split_at_checked(8)?;
                b = rest;
                Wire::Fixed64(v.try_into().ok()?)
            }
            2 => {
                let n = varint(&mut b)? as usize;
                let (v, rest) = b.split_at_checked(n)?;
                b = rest;
                Wire::Bytes(v)
            }
            5 => {
                let (v, rest) = b.split_at_checked(4)?;
                b = rest;
                Wire::Fixed32(v.try_into().ok()?)
            }
            _ => return None,
        };
        out.push((key >> 3, wire));
    }
    Some(out)
}
