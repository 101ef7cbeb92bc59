import BlockEngine
import ImageFormats

/// `mount --overlay OVERLAY EVIDENCE`: every write lands in a qcow2 whose backing file is the
/// evidence, which is only ever opened read-only (O_NOATIME where allowed), so neither its
/// bytes nor its times change.
enum Overlay {
    /// Creates `overlay` over `evidence` (absolute path and format recorded, as qemu-img
    /// `create -b ABS -F FMT` does), or checks that an existing one backs onto that same
    /// file. Returns a note for the user when one was created.
    static func prepare(overlay: String, evidence: String, format: ImageFormat?, clusterSize: UInt64) throws -> String? {
        let evidencePath = try Paths.asNamed(evidence)
        let source = try ImageOpener.open(path: evidencePath, options: .init(writable: false, format: format, lock: false))
        defer { try? source.close() }
        guard let evidenceID = source.driver.file.identity else {
            throw BlockError.usage("\(evidence): cannot tell which file it is (no device and inode)")
        }
        if let existing = try? ImageFile(path: overlay, writable: false) {
            guard existing.identity != evidenceID else {
                throw BlockError.usage("--overlay \(overlay) is the evidence image itself")
            }
            let top = try ImageOpener.open(path: try Paths.asNamed(overlay), options: .init(writable: false, format: .qcow2, lock: false))
            defer { try? top.close() }
            guard let backing = top.backing else {
                throw BlockError.usage("--overlay \(overlay): this qcow2 has no backing file, so it is not an overlay of \(evidence)")
            }
            guard backing.driver.file.identity == evidenceID else {
                throw BlockError.usage("--overlay \(overlay) backs onto \(backing.driver.file.path), not onto \(evidencePath); "
                                       + "use another overlay file for this evidence")
            }
            return nil
        }
        var o = QCOW2Create.Options()
        o.clusterSize = clusterSize
        o.backing = evidencePath
        o.backingFormat = source.driver.info.format
        try QCOW2Create.create(path: overlay, size: source.virtualSize, options: o)
        return "created overlay \(overlay) (qcow2, \(clusterSize / 1024) KiB clusters) over \(evidencePath) (\(source.driver.info.format)); the evidence is only read"
    }
}
