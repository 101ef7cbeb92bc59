import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

extension ImageFormat { public static let vhdx = ImageFormat(name: "vhdx") }

/// VHDX in the format registry: probes by its file identifier; dynamic and fixed images
/// are written, differencing ones read over their parent (found by the locator, checked by
/// its data-write GUID), read-only.
enum VHDXFormat: FormatOpening {
    static let format = ImageFormat.vhdx
    static let writes = true
    static func probe(_ head: [UInt8]) -> Bool { VHDXHeader.probe(head) }
    /// A differencing disk is read-only (its parent is someone else's).
    static func takesWrites(_ file: ImageFile) throws -> Bool {
        (try? VHDXMetadata.read(from: file, header: try VHDXHeader.read(from: file)).hasParent) != true
    }

    static func open(_ r: OpenRequest) throws -> BlockDevice {
        let driver = try VHDXDriver(file: r.file) { r.note($0) }
        guard let locator = driver.metadata.parent else { return BlockDevice(driver: driver) }
        let names = locator.candidates
        // (Existence only picks which name to try; the one tried is opened once, under the
        // backing-file policy.)
        guard let name = names.first(where: { access(PathName.resolve($0, relativeTo: r.path), F_OK) == 0 }),
              let parent = try r.backing(name, format: .vhdx) else {
            throw BlockError.invalid(file: r.path, field: "VHDX parent",
                                     detail: "none of \(names.map { "'\($0.escapingControls)'" }.joined(separator: ", ")) was found beside the child"
                                        + (names.isEmpty ? " (the locator names no path)" : ""))
        }
        // The parent the child was made from: its data-write GUID is the child's linkage.
        guard let p = parent.driver as? VHDXDriver, locator.linkages.contains(p.header.dataWriteGUID.description) else {
            throw BlockError.invalid(file: r.path, field: "VHDX parent linkage",
                                     detail: "the parent \(parent.driver.file.path.escapingControls) is not the disk this child was made from (its data-write GUID differs)")
        }
        return BlockDevice(driver: driver, backing: parent)
    }
}
