/// How an EWF set names its segment files, from the first one: the extension's first letter
/// (E for EnCase/FTK `.E01`, s for SMART `.s01`, in either case as the first file has it),
/// then 01 ... 99, then letters: EAA ... EZZ, FAA ... ZZZ (the first letter counts on once
/// the two after it run out).
public enum EWFSegmentNames {
    /// Segments one set can have by this scheme: 99 numbered, then 26^3 lettered from the
    /// first letter on (fewer when it is past A).
    public static func scheme(of first: String) -> ((Int) -> String?)? {
        let chars = Array(first)
        guard chars.count >= 4, chars[chars.count - 4] == "." else { return nil }
        let lead = chars[chars.count - 3]
        guard chars[chars.count - 2] == "0", chars[chars.count - 1] == "1", lead.isASCII, lead.isLetter else { return nil }
        let stem = String(chars[..<(chars.count - 3)])
        let upper = lead.isUppercase
        let base = Int(lead.asciiValue! | 0x20) - 97  // 0 for a/A
        return { index in
            // index 0 is the first segment (…01).
            guard index >= 0 else { return nil }
            if index < 99 {
                let n = index + 1
                return stem + String(lead) + (n < 10 ? "0" : "") + String(n)
            }
            let k = index - 99  // 0 = xAA
            let first = base + k / (26 * 26)
            guard first < 26 else { return nil }
            let letters = [first, (k / 26) % 26, k % 26].map { Character(UnicodeScalar(UInt8((upper ? 65 : 97) + $0))) }
            return stem + String(letters)
        }
    }
}
