import BlockEngine

/// What the sections of an EWF set say, segment by segment: the media (from the first
/// segment's volume or disk section, checked against every later data section), the case
/// metadata, stored digests and acquisition errors, and the chunk tables. Damaged metadata
/// becomes a note (the disk still reads); damage that changes which bytes the disk holds
/// is an error.
struct EWFSetScan {
    var tables = EWFChunkTables()
    var caseInfo = EWFCaseInfo()
    var media: EWFMedia?
    var notes: [String] = []
    var kinds = Set<String>()
    private var sawHeader2 = false, sawHeader = false, sawDigest = false

    mutating func read(_ sections: [EWFSection], of file: ImageFile, segment index: Int) throws {
        for s in sections {
            kinds.insert(s.type)
            switch s.type {
            case "volume", "disk", "data":
                let d = try s.data(file, limit: 1 << 16)
                guard s.type == "data" || index == 0 else { continue }
                try readMedia(d, section: s.type, of: file)
            case "header2" where index == 0 && !sawHeader2:
                note(file) { try $0.caseInfo.readHeader(try s.data(file, limit: 1 << 20), utf16: true, file: file.path, section: "header2"); $0.sawHeader2 = true }
            case "header" where index == 0 && !sawHeader2 && !sawHeader:
                note(file) { try $0.caseInfo.readHeader(try s.data(file, limit: 1 << 20), utf16: false, file: file.path, section: "header"); $0.sawHeader = true }
            case "xheader" where index == 0:
                note(file) { try $0.caseInfo.readXHeader(try s.data(file, limit: 1 << 20), file: file.path) }
            case "hash" where !sawDigest:
                note(file) { try $0.caseInfo.readHash(try s.data(file, limit: 4096), file: file.path) }
            case "digest":
                note(file) { try $0.caseInfo.readDigest(try s.data(file, limit: 4096), file: file.path); $0.sawDigest = true }
            case "xhash":
                note(file) { try $0.caseInfo.readXHash(try s.data(file, limit: 1 << 20), file: file.path) }
            case "error2":
                note(file) { try $0.caseInfo.readErrors(try s.data(file, limit: 520 + 8 * (1 << 20) + 4), file: file.path) }
            default: break
            }
        }
    }

    /// The first volume/disk section sets the media; a data section must describe the same
    /// (another set's segment otherwise); a damaged data section is only a note (it is a copy).
    private mutating func readMedia(_ d: [UInt8], section: String, of file: ImageFile) throws {
        let m: EWFMedia
        do { m = try EWFMedia.parse(d, file: file.path, section: section) } catch let e as BlockError where section == "data" && media != nil {
            notes.append("\(PathName.baseName(file.path)): \(e)".escapingControls)
            return
        }
        guard let media else { media = m; return }
        guard m.sameMedia(as: media) else {
            throw BlockError.invalid(file: file.path, field: "EWF \(section) section",
                                     detail: "describes other media than the first segment (a segment of another set)")
        }
    }

    /// Damaged case metadata does not keep the disk from being read: it is told instead.
    private mutating func note(_ file: ImageFile, _ body: (inout EWFSetScan) throws -> Void) {
        do { try body(&self) } catch { notes.append("\(PathName.baseName(file.path)): \(error)".escapingControls) }
    }
}
