/// How split raw evidence names its pieces, from the first one: a numeric suffix counted
/// up at the same width (image.001, image.002, ... or image.dd.000, as `split -d`, FTK
/// Imager and dd-based tools write them) or letters counted up (image.aa, image.ab, ... as
/// `split` writes them by default). Only a first piece (…000, …001 or …aa) starts a set.
public enum SplitRawNames {
    /// At most this many pieces (the host address keeps the piece number in 17 bits).
    public static let maxPieces = 65536

    /// The name of piece `index` (0 = `first`), or nil when the scheme runs out.
    public typealias Namer = @Sendable (Int) -> String?

    /// The naming scheme `first` starts, if it is a first piece.
    public static func scheme(of first: String) -> Namer? {
        guard let dot = first.lastIndex(of: "."), dot != first.startIndex else { return nil }
        let stem = String(first[..<dot]), suffix = String(first[first.index(after: dot)...])
        if suffix.count >= 3, suffix.allSatisfy({ $0.isASCII && $0.isNumber }), let start = Int(suffix), start <= 1 {
            let width = suffix.count
            return { i in
                let n = String(start + i)
                return n.count > width ? nil : stem + "." + String(repeating: "0", count: width - n.count) + n
            }
        }
        if suffix.count >= 2, suffix.allSatisfy({ $0 == "a" }) {
            let width = suffix.count
            return { i in
                var digits: [Character] = [], v = i
                for _ in 0..<width {
                    digits.append(Character(UnicodeScalar(UInt8(97 + v % 26))))
                    v /= 26
                }
                return v > 0 ? nil : stem + "." + String(digits.reversed())
            }
        }
        return nil
    }
}
