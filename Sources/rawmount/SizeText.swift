import BlockEngine
import ImageFormats

/// Sizes as qemu-img reads them: a number with an optional fraction, then one of
/// b, k, M, G, T, P, E (any case; powers of 1024) or the same as KiB, MiB, ... A fraction
/// needs a unit ("1.5G", not "1.5"), and the bytes are the whole part of the product.
func parseSize(_ text: String) throws -> UInt64 {
    let t = text.trimmingSpaces
    let shifts: [String: UInt64] = ["": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60]
    let numberEnd = t.firstIndex { !($0.isASCII && ($0.isNumber || $0 == ".")) } ?? t.endIndex
    let number = String(t[..<numberEnd])
    var unit = t[numberEnd...].lowercased()
    if unit.count == 3, unit.hasSuffix("ib") { unit = String(unit.prefix(1)) }
    let bad = BlockError.usage("cannot read size '\(text)' (bytes, or a number with k, M, G, T, P or E, or KiB, MiB, ...: 10G, 1.5T, 512M)")
    guard let shift = shifts[unit], !number.isEmpty else { throw bad }
    let parts = number.split(separator: ".", omittingEmptySubsequences: false)
    // A number that reads but does not fit is too large, not unreadable.
    let tooLarge = BlockError.usage("size '\(text)' is too large (at most 2^64-1 bytes; formats allow less: qcow2 and VDI up to exabytes, VHD 2040 GiB)")
    guard parts.count <= 2, parts[0].allSatisfy(\.isNumber) else { throw bad }
    guard let whole = UInt64(parts[0].isEmpty ? "0" : String(parts[0])) else { throw tooLarge }
    let (scaled, overflow) = whole.multipliedReportingOverflow(by: 1 << shift)
    guard !overflow, shift < 64 else { throw tooLarge }
    guard parts.count == 2 else { return scaled }
    // "1.5" without a unit is refused, as qemu-img refuses it.
    let digits = parts[1]
    guard shift > 0, !digits.isEmpty, digits.count <= 18, digits.allSatisfy(\.isNumber) else { throw bad }
    // fraction * 2^shift, exactly: digits / 10^n scaled by 2^shift without floating point.
    let numerator = UInt64(digits)!, denominator = (0..<digits.count).reduce(UInt64(1)) { acc, _ in acc * 10 }
    let (hi, lo) = numerator.multipliedFullWidth(by: 1 << shift)
    guard hi < denominator else { throw tooLarge }
    let (fraction, _) = denominator.dividingFullWidth((hi, lo))
    let (total, over) = scaled.addingReportingOverflow(fraction)
    guard !over else { throw tooLarge }
    return total
}

/// `-f NAME` (any case) as a format; nil when not given, a usage error naming the known
/// formats when unknown. `what` says which option it was ("format", "backing format").
func parseFormat(_ name: String?, what: String = "format") throws -> ImageFormat? {
    guard let name else { return nil }
    guard let known = ImageFormat(rawValue: name.lowercased()) else {
        throw BlockError.usage("unknown \(what) '\(name)' (known: \(ImageFormat.allCases.map(\.rawValue).joined(separator: ", ")))")
    }
    return known
}
