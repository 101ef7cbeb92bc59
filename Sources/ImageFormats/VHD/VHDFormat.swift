import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

extension ImageFormat { public static let vpc = ImageFormat(name: "vpc") }

/// VHD in the format registry, under QEMU's name (`vpc`): dynamic images probe by their
/// footer copy at the start; a fixed image probes as raw (as in QEMU) and opens with
/// `--format vpc`. Fixed and dynamic images are written; differencing ones are read over
/// their parent (found by its locators, checked by its UUID), read-only.
enum VHDFormat: FormatOpening {
    static let format = ImageFormat.vpc
    static let writes = true
    static func probe(_ head: [UInt8]) -> Bool { VHDFooter.probe(head) }
    /// A differencing disk is read-only (its parent is someone else's).
    static func takesWrites(_ file: ImageFile) throws -> Bool {
        guard try file.size() >= UInt64(VHDFooter.size) else { return true }
        let head = try file.readBytes(count: VHDFooter.size, at: 0, what: "VHD footer")
        return !(probe(head) && be32(head, 60) == VHDFooter.differencing)
    }

    static func open(_ r: OpenRequest) throws -> BlockDevice {
        let driver = try VHDDriver(file: r.file)
        guard driver.footer.isDifferencing, let h = driver.dynamic else { return BlockDevice(driver: driver) }
        let parent = try findParent(r, header: h)
        // A parent changed or replaced since the child was made would show wrong data.
        guard let p = parent.driver as? VHDDriver, p.footer.uuid == h.parentUUID else {
            throw BlockError.invalid(file: r.path, field: "VHD parent UUID",
                                     detail: "the parent \(parent.driver.file.path.escapingControls) is not the disk this child was made from (its UUID differs)")
        }
        return BlockDevice(driver: driver, backing: parent)
    }

    /// The first locator (or the parent's name) that names an existing file.
    static func findParent(_ r: OpenRequest, header h: VHDDynamicHeader) throws -> BlockDevice {
        let names = VHDParentLocator.candidates(h)
        // (Existence only picks which name to try; the one tried is opened once, under the
        // backing-file policy.)
        for name in names where access(PathName.resolve(name, relativeTo: r.path), F_OK) == 0 {
            if let parent = try r.backing(name, format: .vpc) { return parent }
        }
        throw BlockError.invalid(file: r.path, field: "VHD parent",
                                 detail: "none of \(names.map { "'\($0.escapingControls)'" }.joined(separator: ", ")) was found beside the child"
                                    + (names.isEmpty ? " (no parent locator or name)" : ""))
    }
}
