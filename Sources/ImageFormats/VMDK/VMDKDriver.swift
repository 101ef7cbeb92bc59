import BlockEngine
import Dispatch
import Synchronization

/// VMDK over the shared engine: a descriptor (embedded or standalone) and its extents in
/// order. Host addresses carry the extent number in their top bits so the engine's runs
/// never cross files (`resolve`).
public final class VMDKDriver: ImageAllocating, MultiFileMapping {
    enum Kind: Sendable {
        case sparse(VMDKSparseExtent)
        case flat(ImageFile, offset: UInt64)
        case zero
    }
    struct Extent: Sendable {
        let start: UInt64
        let length: UInt64
        let kind: Kind
        let writable: Bool
        var isZero: Bool { if case .zero = kind { return true } else { return false } }
        var file: ImageFile? {
            switch kind { case let .sparse(s): return s.file; case let .flat(f, _): return f; case .zero: return nil }
        }
    }

    public let file: ImageFile
    public let info: ImageInfo

    /// The descriptor and every extent file (each counted once).
    public var hostAllocatedBytes: UInt64 {
        var seen = Set<Int32>(), total: UInt64 = 0
        for f in [file] + extents.compactMap(\.file) where seen.insert(f.fd).inserted { total += f.allocatedBytes() }
        return total
    }
    public let isWritable: Bool
    public let readOnlyReason: String?
    public let descriptor: VMDKDescriptor?
    /// The descriptor lives inside the sparse file (monolithicSparse, streamOptimized).
    public let descriptorIsEmbedded: Bool

    /// Per extent, what qemu-img info lists: the descriptor's extent type (empty for a
    /// sparse file holding its own descriptor, as QEMU shows it), the grain size of a sparse
    /// extent, and whether its grains are compressed.
    public var extentDetails: [(format: String, clusterSize: UInt64?, compressed: Bool)] {
        extents.enumerated().map { i, e in
            let type = descriptorIsEmbedded ? "" : descriptor.flatMap { i < $0.extents.count ? $0.extents[i].type.rawValue : nil } ?? ""
            switch e.kind {
            case let .sparse(s): return (type, s.header.grainBytes, s.header.isCompressed)
            case .flat, .zero: return (type, nil, false)
            }
        }
    }
    let extents: [Extent]
    /// Host addresses carry the extent's index above bit 47 (128 TiB per extent file, 65536
    /// extents: an 8 TiB twoGbMaxExtent image has 4096).
    static let offsetMask = HostAddress.offsetMask
    static let maxExtents = 1 << 16
    /// Where the descriptor's CID value (8 hex digits) lives, for the first-write update.
    private let cidLocation: (file: ImageFile, offset: UInt64, digits: Int)?
    private let cidUpdated = Mutex(false)

    /// Opens `file` (a KDMV sparse file or a text descriptor); extent files are opened next
    /// to it with the same access.
    public init(file: ImageFile, extentFiles: VMDKExtentFiles) throws {
        self.file = file
        let head = try file.readBytes(count: min(512, Int(try file.size())), at: 0, what: "VMDK header")
        var built: [Extent] = []
        var desc: VMDKDescriptor? = nil
        var cid: (ImageFile, UInt64, Int)? = nil
        descriptorIsEmbedded = VMDKSparseHeader.probe(head)
        if descriptorIsEmbedded {
            let sparse = try VMDKSparseExtent(file: file)
            let h = sparse.header
            if h.descriptorOffset != 0 && h.descriptorSize != 0 {
                let bytes = try file.readBytes(count: Int(h.descriptorSize * 512), at: h.descriptorOffset * 512, what: "embedded VMDK descriptor")
                desc = try VMDKDescriptor.parse(bytes, file: file.path)
                cid = Self.findCID(bytes).map { (file, h.descriptorOffset * 512 + $0.offset, $0.digits) }
            }
            built = [Extent(start: 0, length: sparse.length, kind: .sparse(sparse), writable: true)]
        } else {
            let size = try file.size()
            guard size <= UInt64(VMDKDescriptor.maxBytes) else {
                throw BlockError.invalid(file: file.path, field: "VMDK descriptor", detail: "\(size) bytes is larger than 1 MiB")
            }
            let bytes = try file.readBytes(count: Int(size), at: 0, what: "VMDK descriptor")
            let d = try VMDKDescriptor.parse(bytes, file: file.path)
            desc = d
            cid = Self.findCID(bytes).map { (file, $0.offset, $0.digits) }
            guard !d.extents.isEmpty else {
                throw BlockError.invalid(file: file.path, field: "VMDK descriptor", detail: "it lists no extents")
            }
            // Before any file is opened: every extent line may name a file to open.
            guard d.extents.count <= Self.maxExtents else {
                throw BlockError.invalid(file: file.path, field: "VMDK descriptor", detail: "\(d.extents.count) extents (at most \(Self.maxExtents))")
            }
            let sparse = try Self.openSparseExtents(d.extents, descriptor: file.path, extentFiles)
            var start: UInt64 = 0
            for (n, e) in d.extents.enumerated() {
                let kind: Kind
                var length = e.sectors * 512
                switch e.type {
                case .zero:
                    kind = .zero
                case .flat, .vmfs:
                    let f = try Self.openExtent(e, number: n + 1, descriptor: file.path, extentFiles.openOne)
                    let (need, o) = (e.offset * 512).addingReportingOverflow(length)
                    let have = try f.size()
                    guard !o, need <= have, need <= Self.offsetMask else {
                        throw BlockError.invalid(file: file.path, field: "flat extent \(n + 1)",
                                                 detail: "needs \(need) bytes (offset \(e.offset) sectors + \(e.sectors) sectors) but \(e.fileName!) has \(have)")
                    }
                    kind = .flat(f, offset: e.offset * 512)
                case .sparse, .vmfsSparse:
                    let s = sparse[n]!
                    length = s.length // QEMU: the extent header's capacity wins over SECTORS
                    kind = .sparse(s)
                case .vmfsRDM, .vmfsRaw, .seSparse:
                    throw BlockError.unsupported(file: file.path, feature: "VMDK extent type \(e.type.rawValue)")
                }
                if e.access == .noaccess {
                    throw BlockError.unsupported(file: file.path, feature: "NOACCESS extent on line \(n + 1)")
                }
                built.append(Extent(start: start, length: length, kind: kind, writable: e.access == .rw))
                let (next, overflow) = start.addingReportingOverflow(length)
                guard !overflow, next <= UInt64(1) << 60 else {
                    throw BlockError.invalid(file: file.path, field: "VMDK descriptor", detail: "extents add up to more than 2^60 bytes")
                }
                start = next
            }
        }
        if let d = desc, let p = d.parentCID, p != 0xFFFF_FFFF, d.parentFileNameHint == nil {
            throw BlockError.invalid(file: file.path, field: "parentCID", detail: "the descriptor names a parent CID but no parentFileNameHint")
        }
        extents = built
        descriptor = desc
        cidLocation = cid
        let versionOK = built.allSatisfy { if case let .sparse(s) = $0.kind { return s.header.version < 3 && !s.header.isCompressed } else { return true } }
        // An extent file opened read-only (the file policy: it resolves outside the
        // descriptor's folder) makes the whole image read-only.
        let outside = built.enumerated().first { $0.element.file.map { !$0.isWritable } ?? false }
        let shared = VMDKSparseHeader.probe(head) ? nil : Self.sharedFile(built, descriptor: file)  // standalone descriptors
        isWritable = file.isWritable && versionOK && outside == nil && shared == nil && built.allSatisfy { $0.writable && !$0.isZero }
        if !file.isWritable || isWritable {
            readOnlyReason = nil
        } else if let shared {
            readOnlyReason = shared
        } else if let (n, e) = outside, versionOK, built.allSatisfy({ $0.writable && !$0.isZero }) {
            readOnlyReason = "extent \(n + 1) (\(e.file!.path)) resolves to \(e.file!.resolvedPath ?? "a file") outside the descriptor's folder; such files are only read"
        } else {
            readOnlyReason = "an RDONLY or ZERO extent, version 3, or compressed grains"
        }
        let virtualSize = built.last.map { $0.start + $0.length } ?? 0
        let grain: UInt64 = built.compactMap { if case let .sparse(s) = $0.kind { return s.header.grainBytes } else { return nil } }.first ?? 65536
        var details: [(String, String)] = [("extents", "\(built.count)")]
        if let t = desc?.createType { details.append(("create type", t)) }
        if let c = desc?.cid { details.append(("CID", String(c, radix: 16))) }
        if let readOnlyReason { details.append(("access", "read-only (\(readOnlyReason))")) }
        info = ImageInfo(format: "vmdk", virtualSize: virtualSize, clusterSize: grain, details: details)
    }

    /// Why writing would let one part of the image overwrite another: a standalone
    /// descriptor that is also an extent file, a sparse extent file named twice (each would
    /// append into the other's tables), or flat extents whose ranges in one file overlap.
    static func sharedFile(_ extents: [Extent], descriptor: ImageFile) -> String? {
        struct Use { let n: Int; let id: FileIdentity; let start: UInt64; let end: UInt64 }
        var uses: [Use] = []
        if let id = descriptor.identity { uses.append(Use(n: 0, id: id, start: 0, end: .max)) }
        for (n, e) in extents.enumerated() {
            guard let f = e.file, let id = f.identity else { continue }
            switch e.kind {
            case let .flat(_, offset): uses.append(Use(n: n + 1, id: id, start: offset, end: offset + e.length))
            default: uses.append(Use(n: n + 1, id: id, start: 0, end: .max))
            }
        }
        // Usually every file is named once: one pass over a set says so.
        var seen = Set<FileIdentity>(minimumCapacity: uses.count)
        guard !uses.allSatisfy({ seen.insert($0.id).inserted }) else { return nil }
        // Per file, sorted by start: a use overlaps an earlier one exactly when it starts
        // before the furthest end so far (n log n: a split VMDK names thousands of files).
        var clash: (Int, Int)?
        for (_, group) in Dictionary(grouping: uses, by: \.id) where group.count > 1 {
            let sorted = group.sorted { ($0.start, $0.n) < ($1.start, $1.n) }
            var furthest = sorted[0]
            for b in sorted.dropFirst() {
                if b.start < furthest.end {
                    let pair = (min(furthest.n, b.n), max(furthest.n, b.n))
                    if clash.map({ pair < $0 }) ?? true { clash = pair }
                }
                if b.end > furthest.end { furthest = b }
            }
        }
        guard let (a, b) = clash else { return nil }
        let first = a == 0 ? "the descriptor" : "extent \(a)"
        return "\(first) and extent \(b) are the same file and overlap; a write through one would change the other"
    }

    /// The descriptor's sparse extents, by line. A split image has thousands, so files are
    /// opened on all cores, adopted in order (the opener's bookkeeping), then locked and their
    /// headers and directories read on all cores. The error thrown is the one a serial open
    /// would have met first: the first failing extent's.
    static func openSparseExtents(_ list: [VMDKDescriptor.Extent], descriptor: String,
                                  _ files: VMDKExtentFiles) throws -> [Int: VMDKSparseExtent] {
        let lines = list.indices.filter { list[$0].type == .sparse || list[$0].type == .vmfsSparse }
        ImageFile.reserveDescriptors(lines.count)
        let opened = onAllCores(lines.count) { k in
            try openExtent(list[lines[k]], number: lines[k] + 1, descriptor: descriptor, files.open)
        }
        let failed = opened.firstIndex { if case .failure = $0 { return true } else { return false } } ?? lines.count
        var adopted: [(file: ImageFile, isNew: Bool)] = []
        adopted.reserveCapacity(failed)
        for k in 0 ..< failed { adopted.append(files.adopt(try opened[k].get())) }
        let ready = onAllCores(failed) { [adopted] k in
            if adopted[k].isNew { try files.lock(adopted[k].file) }
            return try VMDKSparseExtent(file: adopted[k].file, size: adopted[k].file.sizeAtOpen)
        }
        var out: [Int: VMDKSparseExtent] = [:]
        for k in 0 ..< failed { out[lines[k]] = try ready[k].get() }
        if failed < lines.count { _ = try opened[failed].get() }
        return out
    }

    /// Extent names are relative to the descriptor and must stay in its directory.
    /// A missing extent file is the descriptor's problem: the error names the descriptor.
    static func openExtent(_ e: VMDKDescriptor.Extent, number: Int, descriptor: String,
                           _ openFile: (String) throws -> ImageFile) throws -> ImageFile {
        let path = try extentPath(e.fileName!, descriptor: descriptor)
        do { return try openFile(path) } catch let error as BlockError where error.isFileNotFound {
            throw BlockError.invalid(file: descriptor, field: "extent \(number)", detail: "file '\(e.fileName!)' not found (looked at \(path))")
        }
    }

    static func extentPath(_ name: String, descriptor: String) throws -> String {
        // On the UTF-8 view, not on Characters: a split image names thousands of files.
        let parts = name.utf8.split(separator: UInt8(ascii: "/"))
        guard name.utf8.first != UInt8(ascii: "/"), !parts.contains(where: { $0.elementsEqual("..".utf8) }), !name.isEmpty else {
            throw BlockError.invalid(file: descriptor, field: "extent file name", detail: "'\(name)' leaves the descriptor's directory")
        }
        return PathName.resolve(name, relativeTo: descriptor)
    }

    /// Where the value after "CID=" (at the start of a line) lives and how many hex digits it
    /// has: QEMU writes the CID without zero padding, so it can be shorter than 8.
    static func findCID(_ bytes: [UInt8]) -> (offset: UInt64, digits: Int)? {
        let pattern = Array("CID=".utf8)
        var i = 0
        while i + pattern.count < bytes.count {
            if (i == 0 || bytes[i - 1] == 0x0A) && Array(bytes[i..<(i + 4)]) == pattern {
                let start = i + 4
                var end = start
                while end < bytes.count, end - start < 8, let c = Optional(bytes[end]),
                      (c >= 0x30 && c <= 0x39) || (c >= 0x61 && c <= 0x66) || (c >= 0x41 && c <= 0x46) { end += 1 }
                return end > start ? (UInt64(start), end - start) : nil
            }
            i += 1
        }
        return nil
    }

    func extentIndex(_ offset: UInt64) -> Int {
        var lo = 0, hi = extents.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if extents[mid].start <= offset { lo = mid } else { hi = mid - 1 }
        }
        return lo
    }

    /// The parent image named by the descriptor, if any.
    public var parentFileNameHint: String? {
        guard let d = descriptor, let p = d.parentCID, p != 0xFFFF_FFFF else { return nil }
        return d.parentFileNameHint
    }

    /// Host addresses carry the extent number (`HostAddress`); a zero extent has no file.
    public func hostFile(_ index: Int) -> ImageFile { extents[index].file ?? file }

    private func encode(_ m: Mapping, extent i: Int) -> Mapping {
        if case let .data(h, n) = m { return .data(host: HostAddress(file: i, offset: h).packed, length: n) }
        return m
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let i = extentIndex(offset)
        let e = extents[i]
        let rel = offset - e.start
        let n = min(maxLength, e.length - rel)
        switch e.kind {
        case let .sparse(s): return encode(try s.map(rel, maxLength: n), extent: i)
        case let .flat(_, base): return .data(host: HostAddress(file: i, offset: base + rel).packed, length: n)
        case .zero: return .zero(length: n)
        }
    }

    public func readCompressed(_ mapping: Mapping, guestOffset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        guard case let .compressed(host, _, _) = mapping else { return }
        let i = HostAddress(packed: host).file
        guard case let .sparse(s) = extents[i].kind else { return }
        let inGrain = Int((guestOffset - extents[i].start) % s.header.grainBytes)
        let grain = try s.grain(atSector: HostAddress(packed: host).offset / 512, need: inGrain + buffer.count)
        grain.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inGrain..<(inGrain + buffer.count)])) }
    }

    public func allocate(_ offset: UInt64, length: UInt64) throws -> Allocation {
        let i = extentIndex(offset)
        guard case let .sparse(s) = extents[i].kind, isWritable else { throw BlockError.readOnly(file: file.path) }
        let rel = offset - extents[i].start
        let a = try s.allocate(rel, length: min(length, extents[i].length - rel))
        return Allocation(guestOffset: extents[i].start + a.rel, hostOffset: HostAddress(file: i, offset: a.host).packed,
                          length: a.length, fresh: true) // appended to the extent file
    }

    /// Grain-table commits set only their own entries and an abandoned run is given back
    /// only while it is the last in its extent: fills may overlap.
    public var fillsConcurrently: Bool { true }

    public var contributingFiles: [ImageFile] { [file] + extents.compactMap(\.file) }

    public func metadataOverlap(host: UInt64, length: UInt64) -> MetadataRanges.Range? {
        guard case let .sparse(s) = extents[HostAddress(packed: host).file].kind else { return nil }
        return s.metadata.overlap(HostAddress(packed: host).offset, length)
    }

    public func abandon(_ a: Allocation) {
        guard case let .sparse(s) = extents[HostAddress(packed: a.hostOffset).file].kind else { return }
        let host = HostAddress(packed: a.hostOffset).offset
        s.allocator.giveBack(host, a.length) { s.file.cutBack(to: host) }
    }

    public func commit(_ a: Allocation) throws {
        let i = HostAddress(packed: a.hostOffset).file
        guard case let .sparse(s) = extents[i].kind else { throw BlockError.readOnly(file: file.path) }
        try s.commit(rel: a.guestOffset - extents[i].start, host: HostAddress(packed: a.hostOffset).offset, length: a.length)
    }

    public func zeroRange(_ offset: UInt64, length: UInt64, deallocate: Bool) throws -> (offset: UInt64, length: UInt64) {
        let i = extentIndex(offset)
        let e = extents[i]
        let rel = offset - e.start
        let n = min(length, e.length - rel)
        switch e.kind {
        case .zero: return (offset, n)
        case let .flat(f, base):
            return (offset, try f.punchHole(offset: base + rel, length: n) ? n : 0)
        case let .sparse(s):
            let grain = s.header.grainBytes
            let start = rel.alignedUp(grain), end = (rel + n).alignedDown(grain)
            guard start < end else { return (offset, 0) }
            return (e.start + start, try s.zero(start, length: end - start, hasParent: parentFileNameHint != nil))
        }
    }

    /// The first write after open gives the descriptor a new CID, as VMware and QEMU do, so
    /// children made from the old content notice the change.
    public func willWrite() throws {
        try cidUpdated.withLock { done in
            guard !done else { return }
            done = true
            guard let (f, at, digits) = cidLocation else { return }
            // Same number of digits, so the descriptor keeps its length and layout.
            let limit: UInt64 = digits >= 8 ? UInt64(UInt32.max) : (1 << (4 * UInt64(digits))) - 1
            let value = UInt64.random(in: 1...max(1, limit - 1))
            var hex = Array(String(value, radix: 16).utf8)
            hex = [UInt8](repeating: UInt8(ascii: "0"), count: digits - hex.count) + hex
            try f.write(hex, at: at)
            try f.sync()
        }
    }

    public func flush() throws {
        guard isWritable else { return }
        for e in extents {
            switch e.kind {
            case let .sparse(s): try s.flush()
            case let .flat(f, _): try f.sync()
            case .zero: break
            }
        }
    }

    public func writeBack() throws {
        guard isWritable else { return }
        for e in extents { if case let .sparse(s) = e.kind { try s.writeBack() } }
    }

    public func close() throws {
        try flush()
        for e in extents { if case let .sparse(s) = e.kind { s.allocator.release() } }
    }
}
