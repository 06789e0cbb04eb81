export declare function newCommandId(prefix?: string): string;
