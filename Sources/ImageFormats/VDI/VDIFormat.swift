import BlockEngine

extension ImageFormat { public static let vdi = ImageFormat(name: "vdi") }

/// VDI in the format registry: written, except differencing (snapshot) images, which are
/// opened read-only over the parent found by UUID (`VDIParent`).
enum VDIFormat: FormatOpening {
    static let format = ImageFormat.vdi
    static let writes = true
    static func probe(_ head: [UInt8]) -> Bool { VDIHeader.probe(head) }

    static func takesWrites(_ file: ImageFile) throws -> Bool {
        guard try file.size() >= 0x50 else { return true }
        return le32(try file.readBytes(count: 0x50, at: 0, what: "VDI header"), 0x4C) != 4  // 4: differencing
    }

    static func open(_ r: OpenRequest) throws -> BlockDevice {
        let driver = try VDIDriver(file: r.file) { report in r.note("allocation did not match the block map (a crash?); repaired: \(report)") }
        guard driver.header.isDifferencing else { return BlockDevice(driver: driver) }
        let parent = try r.related(try VDIParent.find(for: r.path, header: driver.header), format: .vdi)
        return BlockDevice(driver: driver, backing: parent)
    }
}
