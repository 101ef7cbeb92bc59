import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

extension ImageFormat { public static let ewf = ImageFormat(name: "ewf") }

/// EWF evidence in the format registry: probed by its EVF signature (EWF2 and logical
/// evidence too, so they are refused by name rather than shown as raw bytes), opened from
/// its first segment with the rest found by the naming scheme, always read-only.
enum EWFFormat: FormatOpening {
    static let format = ImageFormat.ewf

    static func probe(_ head: [UInt8]) -> Bool {
        guard head.count >= 8 else { return false }
        let sig = Array(head[0..<8])
        return [EWFSection.signature, EWFSection.logicalSignature, EWFSection.ewf2Signature, EWFSection.ewf2LogicalSignature].contains(sig)
    }

    /// Segment files one set may have (the host address's file number bounds it too).
    static let maxSegments = 14295

    static func open(_ r: OpenRequest) throws -> BlockDevice {
        let head = try r.file.readBytes(count: 8, at: 0, what: "EWF signature")
        switch head {
        case EWFSection.ewf2Signature:
            throw BlockError.unsupported(file: r.path, feature: "EWF2 (EnCase 7 .Ex01) evidence; rawmount reads EWF (.E01, .s01): "
                + "re-export it with ewfexport -f encase6, or mount it with a libewf that reads EWF2")
        case EWFSection.logicalSignature, EWFSection.ewf2LogicalSignature:
            throw BlockError.unsupported(file: r.path, feature: "logical evidence (.L01/.Lx01): it holds files, not a disk image")
        default: break
        }
        let number = try EWFSection.segmentNumber(of: r.file)
        let name = EWFSegmentNames.scheme(of: r.path)
        guard number == 1 else {
            throw BlockError.usage("\(r.path.escapingControls): segment \(number) of an EWF set; open its first segment"
                + (r.path.count > 3 ? " (\(String(r.path.dropLast(3)).escapingControls)…01)" : ""))
        }
        var files = [r.file]
        var tables = EWFChunkTables()
        var caseInfo = EWFCaseInfo()
        var media: EWFMedia?
        var notes: [String] = []
        var sawHeader2 = false, sawHeader = false, sawDigest = false
        var kinds = Set<String>()
        var index = 0
        while true {
            let file = files[index]
            let sections = try EWFSection.walk(file)
            let segmentNumber = index == 0 ? 1 : try EWFSection.segmentNumber(of: file)
            guard segmentNumber == index + 1 else {
                throw BlockError.invalid(file: file.path, field: "EWF segment number",
                                         detail: "\(segmentNumber) where segment \(index + 1) was expected (a file of another set, or renamed)")
            }
            for s in sections {
                kinds.insert(s.type)
                func metadata(_ body: () throws -> Void) {
                    // Damaged case metadata does not keep the disk from being read: say so.
                    do { try body() } catch { notes.append("\(PathName.baseName(file.path)): \(error)".escapingControls) }
                }
                switch s.type {
                case "volume", "disk", "data":
                    let d = try s.data(file, limit: 1 << 16)
                    guard s.type == "data" || index == 0 else { continue }
                    do {
                        let m = try EWFMedia.parse(d, file: file.path, section: s.type)
                        if let media {
                            guard m.sameMedia(as: media) else {
                                throw BlockError.invalid(file: file.path, field: "EWF \(s.type) section",
                                                         detail: "describes other media than the first segment (a segment of another set)")
                            }
                        } else { media = m }
                    } catch let e as BlockError where s.type == "data" && media != nil {
                        if case .invalid(_, _, let detail) = e, detail.hasPrefix("describes") { throw e }
                        notes.append("\(PathName.baseName(file.path)): \(e)".escapingControls)  // a copy; the volume section counts
                    }
                case "header2" where index == 0 && !sawHeader2:
                    metadata { try caseInfo.readHeader(try s.data(file, limit: 1 << 20), utf16: true, file: file.path, section: "header2"); sawHeader2 = true }
                case "header" where index == 0 && !sawHeader2 && !sawHeader:
                    metadata { try caseInfo.readHeader(try s.data(file, limit: 1 << 20), utf16: false, file: file.path, section: "header"); sawHeader = true }
                case "xheader" where index == 0:
                    metadata { try caseInfo.readXHeader(try s.data(file, limit: 1 << 20), file: file.path) }
                case "hash" where !sawDigest:
                    metadata { try caseInfo.readHash(try s.data(file, limit: 4096), file: file.path) }
                case "digest":
                    metadata { try caseInfo.readDigest(try s.data(file, limit: 4096), file: file.path); sawDigest = true }
                case "xhash":
                    metadata { try caseInfo.readXHash(try s.data(file, limit: 1 << 20), file: file.path) }
                case "error2":
                    metadata { try caseInfo.readErrors(try s.data(file, limit: 520 + 8 * (1 << 20) + 4), file: file.path) }
                default: break
                }
            }
            guard media != nil else {
                throw BlockError.invalid(file: r.path, field: "EWF volume section", detail: "the first segment has no volume or disk section")
            }
            try tables.add(segment: index, file: file, sections: sections)
            if sections.last?.type == "done" { break }
            // A next section: the set goes on in the next segment file.
            guard let name, let nextName = name(index + 1), files.count < maxSegments, files.count < HostAddress.maxFiles else {
                throw BlockError.invalid(file: file.path, field: "EWF segments",
                                         detail: "it ends with a next section, but " + (name == nil
                                            ? "its name does not end in .E01 or .s01, so the next segment cannot be found by name"
                                            : "no more segment names follow"))
            }
            guard access(nextName, F_OK) == 0 else {
                throw BlockError.invalid(file: nextName, field: "EWF segments",
                                         detail: "this segment is missing (\(PathName.baseName(file.path).escapingControls) says more follow)")
            }
            let next = try ReferencedFiles.openPart(nextName, of: r.path, writable: false, shared: !r.options.lock)
            if r.options.lock { try ImageLock.acquire(next, writable: false) }
            files.append(next)
            index += 1
        }
        let m = media!
        guard tables.chunksCovered >= m.neededChunks else {
            throw BlockError.invalid(file: files.last!.path, field: "EWF chunk tables",
                                     detail: "the tables list \(tables.chunksCovered) chunks, the media needs \(m.neededChunks) (a segment is truncated or missing)")
        }
        let flavour = kinds.contains("xheader") ? "EWF-X"
            : kinds.contains("digest") || kinds.contains("header2") ? "EnCase (E01)"
            : kinds.contains("sectors") ? "FTK/EnCase (E01)"
            : EWFSegmentNames.scheme(of: r.path).map { _ in r.path.lowercased().hasSuffix(".s01") ? "SMART (s01)" : "EWF (e01)" } ?? "EWF"
        return BlockDevice(driver: EWFDriver(segments: files, media: m, caseInfo: caseInfo, tables: tables, flavour: flavour, notes: notes))
    }
}
