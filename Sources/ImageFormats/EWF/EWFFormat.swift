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
        var scan = EWFSetScan()
        var index = 0
        while true {
            let file = files[index]
            let sections = try EWFSection.walk(file)
            let segmentNumber = index == 0 ? 1 : try EWFSection.segmentNumber(of: file)
            guard segmentNumber == index + 1 else {
                throw BlockError.invalid(file: file.path, field: "EWF segment number",
                                         detail: "\(segmentNumber) where segment \(index + 1) was expected (a file of another set, or renamed)")
            }
            try scan.read(sections, of: file, segment: index)
            guard scan.media != nil else {
                throw BlockError.invalid(file: r.path, field: "EWF volume section", detail: "the first segment has no volume or disk section")
            }
            try scan.tables.add(segment: index, file: file, sections: sections)
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
        let m = scan.media!, tables = scan.tables, kinds = scan.kinds
        guard tables.chunksCovered >= m.neededChunks else {
            throw BlockError.invalid(file: files.last!.path, field: "EWF chunk tables",
                                     detail: "the tables list \(tables.chunksCovered) chunks, the media needs \(m.neededChunks) (a segment is truncated or missing)")
        }
        let flavour = kinds.contains("xheader") ? "EWF-X"
            : kinds.contains("digest") || kinds.contains("header2") ? "EnCase (E01)"
            : kinds.contains("sectors") ? "FTK/EnCase (E01)"
            : EWFSegmentNames.scheme(of: r.path).map { _ in r.path.lowercased().hasSuffix(".s01") ? "SMART (s01)" : "EWF (e01)" } ?? "EWF"
        return BlockDevice(driver: EWFDriver(segments: files, media: m, caseInfo: scan.caseInfo, tables: tables, flavour: flavour, notes: scan.notes))
    }
}
