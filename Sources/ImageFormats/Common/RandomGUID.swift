/// 16 random bytes with the version-4 and variant bits set. `mixedEndian`: the GUID layout
/// whose first three fields are little-endian (VDI, VHDX), so the version nibble is in byte
/// 7; otherwise RFC 4122's byte order (VHD), with it in byte 6.
func randomGUID(mixedEndian: Bool = true) -> [UInt8] {
    var u = (0..<16).map { _ in UInt8.random(in: 0...255) }
    let version = mixedEndian ? 7 : 6
    u[version] = (u[version] & 0x0F) | 0x40
    u[8] = (u[8] & 0x3F) | 0x80
    return u
}
